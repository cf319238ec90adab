"""The run's device and where tensors go (device.py); process-wide settings made once, before the work: OpenMP's barrier
spin (openmp.py, set by the entry point) and glibc's mmap threshold (allocator.py, set by `prune` when it runs the
model); and how numba kernels share torch's threads (chunks.py)."""
