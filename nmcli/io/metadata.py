"""The safetensors `__metadata__` keys nmsparse writes and reads: defined here and nowhere else.

safetensors metadata is a str -> str map, so structured values are JSON strings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from nmcli import __version__
from nmcli.errors import NMSparseError
from nmcli.nm import CONVENTION, NMPattern, parse_pattern

VERSION = "nmsparse.version"
FORMAT = "nmsparse.format"
PATTERN = "nmsparse.pattern"
CONVENTION_KEY = "nmsparse.convention"
ZEROS_PER_GROUP = "nmsparse.zeros_per_group"
LAYERS = "nmsparse.layers"  # {tensor name: {"layout": ..., "k_axis": ..., "pattern": "N:M"}}
SKIPPED = "nmsparse.skipped"  # {tensor name: reason}
MODEL = "nmsparse.model"  # {"source": "timm"|"hf", "name": ..., "kwargs": {...}}
RECIPE = "nmsparse.recipe"
ONESHOT = "nmsparse.oneshot"  # {"method": "sparsegpt", "calib": ..., "samples": ..., ...}

DENSE_MASKED = "dense-masked"  # dense-shaped tensors with exact zeros


@dataclass
class SparsityMetadata:
    """What a pruned or fine-tuned checkpoint says about itself."""

    pattern: NMPattern
    layers: dict[str, dict] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    model: dict | None = None
    recipe: dict | None = None
    format: str = DENSE_MASKED
    oneshot: dict | None = None

    def to_strings(self) -> dict[str, str]:
        out = {
            VERSION: __version__,
            FORMAT: self.format,
            PATTERN: str(self.pattern),
            CONVENTION_KEY: CONVENTION,
            ZEROS_PER_GROUP: str(self.pattern.zeros_per_group),
            LAYERS: json.dumps(self.layers, sort_keys=True),
            SKIPPED: json.dumps(self.skipped, sort_keys=True),
        }
        if self.model is not None:
            out[MODEL] = json.dumps(self.model, sort_keys=True)
        if self.recipe is not None:
            out[RECIPE] = json.dumps(self.recipe, sort_keys=True)
        if self.oneshot is not None:
            out[ONESHOT] = json.dumps(self.oneshot, sort_keys=True)
        return out

    @classmethod
    def from_strings(cls, meta: dict[str, str], where: str) -> SparsityMetadata | None:
        """None when the file carries no nmsparse metadata; an error when it carries broken metadata."""
        if PATTERN not in meta:
            return None
        try:
            return cls(
                pattern=parse_pattern(meta[PATTERN]),
                layers=json.loads(meta.get(LAYERS, "{}")),
                skipped=json.loads(meta.get(SKIPPED, "{}")),
                model=json.loads(meta[MODEL]) if MODEL in meta else None,
                recipe=json.loads(meta[RECIPE]) if RECIPE in meta else None,
                format=meta.get(FORMAT, DENSE_MASKED),
                oneshot=json.loads(meta[ONESHOT]) if ONESHOT in meta else None,
            )
        except (json.JSONDecodeError, NMSparseError) as exc:
            raise NMSparseError(f"{where}: broken nmsparse metadata ({exc}); re-run prune on the original") from None


def model_from_strings(meta: dict[str, str]) -> dict | None:
    """The architecture a file was written for, when nmsparse wrote it."""
    try:
        return json.loads(meta[MODEL]) if MODEL in meta else None
    except json.JSONDecodeError:
        return None
