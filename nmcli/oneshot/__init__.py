"""Data-aware one-shot N:M (methods.md §7): Wanda and SparseGPT, calibrated block by block."""
