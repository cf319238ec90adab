"""One-shot N:M: the prune plan (plan.py), magnitude streamed tensor by tensor (magnitude.py), and the data-aware
methods of methods.md §7 (Wanda, SparseGPT, ALPS), calibrated block by block."""
