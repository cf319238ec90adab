"""Pure tensor math for N:M sparsity: patterns, reduction-axis layouts, masks, compliance."""

from nmcli.nm.compliance import Compliance, compliance, count_nonfinite, detect_pattern, nonzero_fraction
from nmcli.nm.layout import CONV, HF_CONV1D, LINEAR, LINEAR_T, Layout, layout_by_name, reduction_length
from nmcli.nm.mask import MASKABLE_DTYPES, apply_nm, apply_nm_, group_mask, nm_mask
from nmcli.nm.pattern import CONVENTION, TWO_FOUR, NMPattern, parse_pattern

__all__ = [
    "MASKABLE_DTYPES",
    "CONV",
    "CONVENTION",
    "Compliance",
    "HF_CONV1D",
    "LINEAR",
    "LINEAR_T",
    "Layout",
    "NMPattern",
    "TWO_FOUR",
    "apply_nm",
    "apply_nm_",
    "compliance",
    "count_nonfinite",
    "detect_pattern",
    "group_mask",
    "layout_by_name",
    "nm_mask",
    "nonzero_fraction",
    "parse_pattern",
    "reduction_length",
]
