import math

import pytest
import torch

from nmcli.errors import NMSparseError
from nmcli.nm import (
    CONV,
    HF_CONV1D,
    LINEAR,
    NMPattern,
    apply_nm,
    apply_nm_,
    compliance,
    detect_pattern,
    group_mask,
    nm_mask,
    parse_pattern,
)
from tests.reference import brute_force_mask

PATTERNS = ["1:4", "2:4", "3:4", "1:8", "2:8", "4:8", "7:8", "1:16", "4:16", "1:32", "16:32", "31:32"]


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), (" 1:32 ", (1, 32)), ("7:8", (7, 8))])
def test_parse_pattern_valid(text, expected):
    p = parse_pattern(text)
    assert (p.n, p.m) == expected
    assert p.zeros_per_group == expected[1] - expected[0]


@pytest.mark.parametrize("text", ["4:4", "0:4", "2-4", "3:2", "a:b", "", "2:4:8", "-1:4"])
def test_parse_pattern_invalid_names_the_value(text):
    with pytest.raises(NMSparseError, match="invalid N:M pattern"):
        parse_pattern(text)


def test_dense_stage_allowed_only_on_request():
    assert parse_pattern("4:4", allow_dense=True).is_dense


def _tie_heavy(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-2, 3, shape, generator=g).float()  # values in {-2..2}: many ties and zeros


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("kind", ["random", "ties"])
def test_linear_mask_matches_brute_force(pattern, kind):
    p = parse_pattern(pattern)
    shape = (6, 64)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)) if kind == "random" else _tie_heavy(shape, 2)
    assert torch.equal(nm_mask(w, p, LINEAR), brute_force_mask(w, p.n, p.m, k_axis=1))


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "1:8", "3:8"])
@pytest.mark.parametrize("shape", [(4, 8, 3, 3), (3, 16, 5), (2, 8, 2, 3, 2)])
def test_conv_mask_groups_input_channels_at_each_tap(pattern, shape):
    p = parse_pattern(pattern)
    for w in (torch.randn(shape, generator=torch.Generator().manual_seed(3)), _tie_heavy(shape, 4)):
        assert torch.equal(nm_mask(w, p, CONV), brute_force_mask(w, p.n, p.m, k_axis=1))


@pytest.mark.parametrize("pattern", ["2:4", "1:8"])
def test_hf_conv1d_groups_along_axis_0(pattern):
    p = parse_pattern(pattern)
    w = _tie_heavy((32, 5), 5)
    assert torch.equal(nm_mask(w, p, HF_CONV1D), brute_force_mask(w, p.n, p.m, k_axis=0))


def test_hand_computed_masks():
    w = torch.tensor([[0.1, -0.9, 0.5, 0.2, 3.0, 3.0, 3.0, 3.0]])
    assert nm_mask(w, NMPattern(2, 4), LINEAR).tolist() == [[False, True, True, False, True, True, False, False]]
    assert nm_mask(w, NMPattern(1, 8), LINEAR).tolist() == [[False, False, False, False, True, False, False, False]]
    # already sparse: still exactly N kept, lower index first among the zeros
    z = torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    assert nm_mask(z, NMPattern(2, 4), LINEAR).tolist() == [[True, False, False, True]]


def test_nan_is_kept_as_largest_and_mask_stays_exact():
    w = torch.tensor([[1.0, math.nan, 2.0, 0.5, math.nan, math.nan, 1.0, 1.0]])
    m = nm_mask(w, NMPattern(2, 4), LINEAR)
    assert m.tolist() == [[False, True, True, False, True, True, False, False]]
    assert torch.equal(m, brute_force_mask(w, 2, 4, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_apply_nm_keeps_dtype_and_zeros_exactly(dtype):
    w = torch.randn(16, 32).to(dtype)
    out = apply_nm(w, NMPattern(1, 4), LINEAR)
    assert out.dtype == dtype
    assert torch.equal(out != 0, nm_mask(w, NMPattern(1, 4), LINEAR) & (w != 0))
    assert torch.equal(out[out != 0], w[out != 0])


@pytest.mark.parametrize("layout,shape", [(LINEAR, (8, 64)), (CONV, (8, 16, 3, 3)), (HF_CONV1D, (64, 8))])
def test_in_place_and_chunked_apply_equal_brute_force(layout, shape, monkeypatch):
    import nmcli.nm.mask

    # the thread pool on many small chunks with a ragged last one, as on a large tensor
    monkeypatch.setattr(nmcli.nm.mask, "CHUNK_ELEMENTS", 20)
    monkeypatch.setattr(nmcli.nm.mask, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    w = _tie_heavy(shape, 7)
    expected = w * brute_force_mask(w, 2, 4, layout.k_axis)
    assert torch.equal(apply_nm(w, NMPattern(2, 4), layout), expected)
    in_place = w.clone()
    assert apply_nm_(in_place, NMPattern(2, 4), layout) == 0
    assert torch.equal(in_place, expected)


def test_in_place_apply_on_a_non_contiguous_view_writes_through():
    base = _tie_heavy((64, 8), 8)
    view = base.t()  # [8, 64] with K = 64 not innermost in memory
    expected = view * brute_force_mask(view, 1, 8, k_axis=1)
    apply_nm_(view, NMPattern(1, 8), LINEAR)
    assert torch.equal(base.t(), expected)


def test_nan_group_and_tied_group_together_stay_exact():
    """Issue 10: a NaN group (too few kept at a NaN threshold) next to an all-tie group (too many) used to
    cancel out in a chunk-wide count, leaving 0 and 4 kept."""
    groups = torch.tensor([[math.nan, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0]])
    assert group_mask(groups, 2).tolist() == [[True, True, False, False], [True, False, False, True]]


def test_nans_of_any_payload_tie_with_each_other():
    """A NaN with a larger payload must not outrank an earlier NaN: all NaNs tie, the lower index wins."""
    bits = torch.tensor([[0x7FC00000, 0x7FC00123, 0, 0], [0x7F800001, -0x00400000, 0, 0]], dtype=torch.int32)
    groups = bits.view(torch.float32)  # row 1: a signalling NaN, then a negative quiet NaN
    assert groups.isnan()[:, :2].all()
    assert group_mask(groups, 1).tolist() == [[True, False, False, False]] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_cpu_kernel_agrees_with_the_ranking_path_of_other_devices(dtype, pattern):
    """Two independent implementations (compiled CPU pass; ranks by comparison used for CUDA) on ties, NaN and
    Inf."""
    from nmcli.nm.mask import _ranked_group_mask

    p = parse_pattern(pattern)
    g = torch.Generator().manual_seed(11)
    groups = torch.randint(-3, 4, (2000, p.m), generator=g).to(dtype) / 4  # many exact ties and signed zeros
    groups[::13, 0] = math.nan
    groups[5::17, -1] = -math.inf
    groups[7::19] = torch.randn(groups[7::19].shape, generator=g).to(dtype)
    assert torch.equal(group_mask(groups, p.n), _ranked_group_mask(groups, p.n))
    assert torch.all(group_mask(groups, p.n).sum(1) == p.n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_in_place_apply_equals_the_brute_force_mask_on_ties_nan_and_inf(dtype, pattern, monkeypatch):
    """The in-place path has kernels of its own (one branch-free pass for M = 4 and N = 1, then exact ranks for
    tied groups): on many exact ties, signed zeros, NaN and Inf it must keep exactly the brute-force entries."""
    import nmcli.nm.mask

    monkeypatch.setattr(nmcli.nm.mask, "CHUNK_ELEMENTS", 96)
    monkeypatch.setattr(nmcli.nm.mask, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    p = parse_pattern(pattern)
    g = torch.Generator().manual_seed(5)
    w = (torch.randint(-3, 4, (40, 4 * p.m), generator=g) / 4).to(dtype)  # exact ties and +-0.0 everywhere
    w[::7, 1] = math.nan
    w[3::11, -2] = math.inf
    w[5::13, 0] = -math.inf
    w[9::5] = torch.randn(w[9::5].shape, generator=g).to(dtype)
    keep = brute_force_mask(w, p.n, p.m, 1)
    nan_rows = w.isnan().any(1)
    out = w.clone()
    apply_nm_(out, p, LINEAR)
    assert torch.equal(out.ne(0) | out.isnan(), (w.ne(0) | w.isnan()) & keep), pattern
    assert torch.equal(out.nan_to_num(), (w * keep).nan_to_num())
    assert nan_rows.any()


def test_in_place_apply_with_inf_and_nan_leaves_exact_zeros():
    out = torch.tensor([[math.inf, math.inf, math.inf, 1.0, 2.0, math.nan, 0.5, math.nan]])
    assert apply_nm_(out, NMPattern(2, 4), LINEAR) == 5  # counted before masking: 3 Inf + 2 NaN
    expected = torch.tensor([[math.inf, math.inf, 0.0, 0.0, 0.0, math.nan, 0.0, math.nan]])
    assert torch.equal(out.isnan(), expected.isnan())
    assert torch.equal(out.nan_to_num(), expected.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", [LINEAR, CONV, HF_CONV1D], ids=["linear", "conv", "conv1d"])
def test_in_place_apply_counts_nan_and_inf_in_its_own_pass(dtype, layout, monkeypatch):
    """prune refuses NaN/Inf weights from this count alone (no second pass): it must equal isfinite's count, over
    the chunk pool too, for signalling/negative NaNs, -Inf and the largest finite value (which is not Inf)."""
    import nmcli.nm.mask

    monkeypatch.setattr(nmcli.nm.mask, "CHUNK_ELEMENTS", 24)
    monkeypatch.setattr(nmcli.nm.mask, "PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    shape = {"linear": (12, 16), "conv": (6, 8, 3, 3), "hf_conv1d": (16, 12)}[layout.name]
    w = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    flat = w.view(-1)
    flat[::7] = math.nan
    flat[3::11] = -math.inf
    flat[5::13] = math.inf
    flat[1::17] = torch.finfo(dtype).max
    expected = int((~torch.isfinite(w)).sum())
    assert expected > 10
    assert apply_nm_(w, NMPattern(2, 4), layout) == expected
    assert apply_nm_(torch.randn(shape).to(dtype), NMPattern(1, 4), layout) == 0


def test_group_mask_has_exactly_n_per_group_on_large_random():
    g = torch.randn(10_000, 32)
    g[::7] = 0.0  # all-tie rows
    for n in (1, 2, 4, 8, 31):
        assert torch.all(group_mask(g, n).sum(1) == n)


def test_compliance_on_hand_built_tensors():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 3.0]])
    c = compliance(w, NMPattern(2, 4), LINEAR)
    assert (c.groups, c.violating_groups, c.max_nonzeros_per_group) == (4, 1, 3)
    assert c.fraction == pytest.approx(0.75) and not c.compliant
    c18 = compliance(w, NMPattern(4, 8), LINEAR)
    assert (c18.groups, c18.violating_groups, c18.max_nonzeros_per_group) == (2, 1, 5)


def test_compliance_rejects_k_not_divisible():
    with pytest.raises(NMSparseError, match="K=6 is not divisible by M=4"):
        compliance(torch.ones(2, 6), NMPattern(2, 4), LINEAR)


def test_detect_pattern():
    w = torch.randn(32, 64)
    assert detect_pattern(w, LINEAR) is None
    assert detect_pattern(apply_nm(w, NMPattern(2, 4), LINEAR), LINEAR) == NMPattern(2, 4)
    assert detect_pattern(apply_nm(w, NMPattern(1, 8), LINEAR), LINEAR) == NMPattern(1, 8)
    assert detect_pattern(apply_nm(w, NMPattern(1, 32), LINEAR), LINEAR) == NMPattern(1, 32)
