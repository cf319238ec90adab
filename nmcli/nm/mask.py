"""Exact N:M magnitude masks: keep the N largest |w| of each group, ties to the lower index; NaN counts as the
largest magnitude (so it is kept and later reported rather than silently hidden).

Magnitudes are compared as integers: the bits of a float with its sign cleared order exactly like |w| (every NaN is
mapped to one value above Inf, so NaNs tie with each other). That works the same for fp16, bf16, fp32 and fp64.

CPU tensors go through one compiled pass over the groups (numba, `nogil`, no full-size temporaries). Large
tensors are split into row chunks that a small pool of threads takes one at a time, each chunk single-threaded. So
there is no barrier between threads except the final one, and a thread whose core is busy with another process
just takes fewer chunks: the cost no longer depends on every core being free (bench/mask.py measures both).
Other devices (CUDA while training) rank the same integer keys within each group by comparing one position
with all the others at a time, or take the first maximum at N = 1.
"""

from __future__ import annotations


import numba
import numpy as np
import torch

from nmcli.nm.compliance import count_nonfinite
from nmcli.nm.layout import Layout, from_groups, to_groups
from nmcli.nm.pattern import NMPattern
from nmcli.runtime.chunks import in_chunks

# float dtype -> (integer dtype of the same width, mask clearing the sign bit, bits of +Inf)
_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
MASKABLE_DTYPES = frozenset(_BITS)  # float weights N:M can mask exactly (float8 and integer weights cannot)
CHUNK_ELEMENTS = 1 << 18  # elements a worker takes at a time: cache-sized, and 64 chunks per 4096x4096
PARALLEL_MIN_ELEMENTS = 1 << 18  # below this a pool costs more than it saves


def magnitude_keys(groups: torch.Tensor) -> torch.Tensor:
    """Integer keys ordered exactly like |w| (all NaNs equal, above Inf), same shape as `groups`; |w| itself for
    dtypes without a bit layout here (integers, fp8)."""
    if groups.dtype not in _BITS:
        return groups.abs()
    int_dtype, abs_mask, inf_bits = _BITS[groups.dtype]
    keys = groups.contiguous().view(int_dtype) & abs_mask
    return keys.clamp_(max=inf_bits + 1)


@numba.njit(nogil=True, cache=True, inline="always")
def _exact_keep(keys, n, keep):  # pragma: no cover - compiled
    """Rank every key of one group (greater keys, then equal keys at a lower index, rank first); keep rank < N."""
    m = keys.shape[0]
    for j in range(m):
        rank = 0
        for i in range(m):
            rank += (keys[i] > keys[j]) | ((keys[i] == keys[j]) & (i < j))
        keep[j] = rank < n


@numba.njit(nogil=True, cache=True)
def _keep_groups(bits, n, abs_mask, nan_key, out):  # pragma: no cover - compiled
    """`out[g, j]`: is entry j among the N largest magnitudes of group g (rows of raw float bits)? Returns how many
    entries are NaN/Inf (key at or above Inf's), counted in the same pass so no caller reads the tensor again.

    Fast path without data-dependent branches: the N-th largest key of the group (a min/max network for M = 4,
    the maximum for N = 1), keep what is at or above it. Only a group whose kept count is then not N (a tie at
    the threshold) is ranked exactly; for other N:M every group is ranked.
    """
    groups, m = bits.shape
    keys = np.empty(m, np.int64)
    keep = np.empty(m, np.bool_)
    nonfinite = 0
    for g in range(groups):
        threshold = -1
        for j in range(m):
            keys[j] = min(bits[g, j] & abs_mask, nan_key)
            threshold = max(threshold, keys[j])
            nonfinite += keys[j] >= nan_key - 1
        if m == 4 and n > 1:
            hi1, lo1 = max(keys[0], keys[1]), min(keys[0], keys[1])
            hi2, lo2 = max(keys[2], keys[3]), min(keys[2], keys[3])
            if n == 2:
                threshold = max(min(hi1, hi2), max(lo1, lo2))
            else:
                threshold = min(max(lo1, lo2), min(hi1, hi2))
        elif n > 1:
            threshold = nan_key + 1  # nothing passes: every group is ranked exactly
        kept = 0
        for j in range(m):
            out[g, j] = keys[j] >= threshold
            kept += keys[j] >= threshold
        if kept != n:
            _exact_keep(keys, n, keep)
            for j in range(m):
                out[g, j] = keep[j]
    return nonfinite


@numba.njit(nogil=True, cache=True)
def _zero_dropped(bits, keep):  # pragma: no cover - compiled
    """Set the entries outside `keep` to +0.0 (all-zero bits) in place; a multiply, not a branch (half the
    entries go each way, which a branch predictor cannot guess)."""
    flat_bits, flat_keep = bits.reshape(-1), keep.reshape(-1)
    for i in range(flat_bits.shape[0]):
        flat_bits[i] *= flat_keep[i]


@numba.njit(nogil=True, cache=True, inline="always")
def _threshold4(k0, k1, k2, k3, n):  # pragma: no cover - compiled
    """The N-th largest of four keys: a min/max network, no branch on the data."""
    hi1, lo1, hi2, lo2 = max(k0, k1), min(k0, k1), max(k2, k3), min(k2, k3)
    if n == 1:
        return max(hi1, hi2)
    if n == 2:
        return max(min(hi1, hi2), max(lo1, lo2))
    return min(max(lo1, lo2), min(hi1, hi2))


@numba.njit(nogil=True, cache=True)
def _zero_below_threshold4(flat, n, abs_mask, nan_key, ties):  # pragma: no cover - compiled
    """In place, for M = 4: zero every entry below its group's N-th largest key, in one pass with the group size
    fixed and no data-dependent branch, which LLVM turns into SIMD code (faster than `_keep_groups` +
    `_zero_dropped`; README's benchmark section). `ties[g]` marks a group that kept more
    than N (a tie at the threshold) for `_settle_ties`. Returns the NaN/Inf count. What stays keeps its bits and
    what was zeroed was below the threshold (nothing is when the threshold is 0), so a tied group is settled
    afterwards on the same keys it had.

    The four key lines are written out here and in `_mark4` on purpose: a shared helper returning the keys as a
    tuple stopped LLVM from vectorising the loop (several times slower; README's benchmark section)."""
    nonfinite = 0
    inf_key = nan_key - 1
    for g in range(flat.shape[0] // 4):
        i = 4 * g
        k0 = min(flat[i] & abs_mask, nan_key)
        k1 = min(flat[i + 1] & abs_mask, nan_key)
        k2 = min(flat[i + 2] & abs_mask, nan_key)
        k3 = min(flat[i + 3] & abs_mask, nan_key)
        nonfinite += (k0 >= inf_key) + (k1 >= inf_key) + (k2 >= inf_key) + (k3 >= inf_key)
        threshold = _threshold4(k0, k1, k2, k3, n)
        flat[i] = flat[i] if k0 >= threshold else 0
        flat[i + 1] = flat[i + 1] if k1 >= threshold else 0
        flat[i + 2] = flat[i + 2] if k2 >= threshold else 0
        flat[i + 3] = flat[i + 3] if k3 >= threshold else 0
        ties[g] = (k0 >= threshold) + (k1 >= threshold) + (k2 >= threshold) + (k3 >= threshold) != n
    return nonfinite


@numba.njit(nogil=True, cache=True)
def _mark4(flat, n, abs_mask, nan_key, ties, keep):  # pragma: no cover - compiled
    """`_zero_below_threshold4` writing the keep mask instead of zeroing (faster than `_keep_groups` at M = 4)."""
    for g in range(flat.shape[0] // 4):
        i = 4 * g
        k0 = min(flat[i] & abs_mask, nan_key)
        k1 = min(flat[i + 1] & abs_mask, nan_key)
        k2 = min(flat[i + 2] & abs_mask, nan_key)
        k3 = min(flat[i + 3] & abs_mask, nan_key)
        threshold = _threshold4(k0, k1, k2, k3, n)
        keep[i] = k0 >= threshold
        keep[i + 1] = k1 >= threshold
        keep[i + 2] = k2 >= threshold
        keep[i + 3] = k3 >= threshold
        ties[g] = (k0 >= threshold) + (k1 >= threshold) + (k2 >= threshold) + (k3 >= threshold) != n


@numba.njit(nogil=True, cache=True)
def _settle_ties(bits, ties, n, abs_mask, nan_key, keep):  # pragma: no cover - compiled
    """Rank the groups marked in `ties` exactly (ties to the lower index) and keep N: into `keep` when it has
    the groups' shape, else by zeroing the others in `bits`."""
    m = bits.shape[1]
    keys = np.empty(m, np.int64)
    ranked = np.empty(m, np.bool_)
    for g in range(bits.shape[0]):
        if ties[g]:
            for j in range(m):
                keys[j] = min(bits[g, j] & abs_mask, nan_key)
            _exact_keep(keys, n, ranked)
            for j in range(m):
                if keep.shape[0]:
                    keep[g, j] = ranked[j]
                else:
                    bits[g, j] *= ranked[j]


_IN_PLACE = np.empty((0, 0), dtype=np.bool_)  # `_settle_ties` zeroes in `bits`


def _mask_chunk(bits: np.ndarray, n: int, abs_mask: int, nan_key: int, keep: np.ndarray) -> None:
    """The exact keep mask of a chunk of groups [G, M], into `keep`."""
    if bits.shape[1] != 4:
        _keep_groups(bits, n, abs_mask, nan_key, keep)
        return
    ties = np.empty(bits.shape[0], dtype=np.bool_)
    _mark4(bits.reshape(-1), n, abs_mask, nan_key, ties, keep.reshape(-1))
    _settle_ties(bits, ties, n, abs_mask, nan_key, keep)


def _zero_chunk(bits: np.ndarray, n: int, abs_mask: int, nan_key: int) -> int:
    """Exact N:M of a chunk of groups [G, M], in place; returns its NaN/Inf count (counted before zeroing)."""
    if bits.shape[1] == 4:
        ties = np.empty(bits.shape[0], dtype=np.bool_)
        nonfinite = _zero_below_threshold4(bits.reshape(-1), n, abs_mask, nan_key, ties)
        _settle_ties(bits, ties, n, abs_mask, nan_key, _IN_PLACE)
        return nonfinite
    keep = np.empty(bits.shape, dtype=np.bool_)
    nonfinite = _keep_groups(bits, n, abs_mask, nan_key, keep)
    _zero_dropped(bits, keep)
    return nonfinite


def _for_row_chunks(rows: int, m: int, work) -> None:  # noqa: ANN001 - work(start, stop)
    """Run `work` over consecutive cache-sized row ranges; large tensors over torch's thread count of workers."""
    in_chunks(work, rows, max(1, CHUNK_ELEMENTS // m), parallel=rows * m >= PARALLEL_MIN_ELEMENTS)


def _cpu_bits(groups: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """The groups' bits as a numpy view, read while the mask is made. Through DLPack, not `Tensor.numpy()`: that
    marks the weight's storage as never resizable, and FSDP2 frees a gathered weight by resizing its storage."""
    int_dtype, abs_mask, inf_bits = _BITS[groups.dtype]
    return np.from_dlpack(groups.view(int_dtype)), abs_mask, inf_bits + 1


def _ranked_group_mask(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Any device, in a few elementwise kernels per group position (no sort; `topk` breaks ties unpredictably):
    N = 1 keeps the first maximal key (argmax returns the lowest index); otherwise an entry's rank counts the keys
    of its group that come first (greater, or equal at a lower index), and rank < N is kept."""
    keys = magnitude_keys(groups)
    if n == 1:
        return torch.arange(groups.shape[1], device=groups.device) == keys.argmax(dim=1, keepdim=True)
    rank = torch.zeros_like(keys, dtype=torch.int32)
    for j in range(groups.shape[1]):
        key = keys[:, j:j + 1]
        rank[:, j + 1:] += key >= keys[:, j + 1:]
        rank[:, :j] += key > keys[:, :j]
    return rank < n


def group_mask(groups: torch.Tensor, n: int) -> torch.Tensor:
    """Keep mask for a [G, M] tensor of groups: exactly `n` True per row."""
    if n >= groups.shape[1]:
        return torch.ones_like(groups, dtype=torch.bool)
    if groups.device.type != "cpu" or groups.dtype not in _BITS:
        return _ranked_group_mask(groups, n)
    groups = groups.contiguous()
    mask = torch.empty_like(groups, dtype=torch.bool)
    bits, abs_mask, nan_key = _cpu_bits(groups)
    out = mask.numpy()
    _for_row_chunks(groups.shape[0], groups.shape[1], lambda s, e: _mask_chunk(bits[s:e], n, abs_mask, nan_key, out[s:e]))
    return mask


def nm_mask(weight: torch.Tensor, pattern: NMPattern, layout: Layout) -> torch.Tensor:
    """Boolean keep mask of `weight`'s shape: `pattern` along the layout's reduction axis."""
    groups = to_groups(weight.detach(), layout, pattern.m)
    return from_groups(group_mask(groups, pattern.n), weight.shape, layout)


def apply_nm(weight: torch.Tensor, pattern: NMPattern, layout: Layout) -> torch.Tensor:
    """`weight` with everything outside the N:M mask set to exact zeros (same dtype and shape)."""
    return weight.masked_fill(~nm_mask(weight, pattern, layout), 0)


def apply_nm_(weight: torch.Tensor, pattern: NMPattern, layout: Layout) -> int:
    """In-place `apply_nm`: no full-size mask, so peak memory stays near the tensor itself (plus one copy for
    conv layouts, whose K axis is not contiguous). Dropped entries become +0.0.

    Returns how many entries were NaN/Inf before masking. On the CPU they are counted inside the mask's own pass,
    so the streaming prune (where the largest tensor bounds memory and each pass over it costs time) refuses
    non-finite weights without reading the tensor once more.
    """
    if pattern.n >= pattern.m:
        return count_nonfinite(weight)
    groups = to_groups(weight, layout, pattern.m)
    if groups.device.type != "cpu" or groups.dtype not in _BITS:
        nonfinite = count_nonfinite(groups)
        groups = groups.masked_fill(~_ranked_group_mask(groups, pattern.n), 0)
    else:
        groups = groups.contiguous()  # a copy only when the K axis is not the innermost one
        bits, abs_mask, nan_key = _cpu_bits(groups)
        counts = []  # one entry per chunk; list.append is atomic under the GIL
        _for_row_chunks(
            groups.shape[0], groups.shape[1],
            lambda start, stop: counts.append(_zero_chunk(bits[start:stop], pattern.n, abs_mask, nan_key)),
        )
        nonfinite = sum(counts)
    if groups.data_ptr() != weight.data_ptr():
        weight.copy_(from_groups(groups, weight.shape, layout))
    return nonfinite
