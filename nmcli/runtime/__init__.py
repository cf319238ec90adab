"""Process-wide settings made once, before the work: OpenMP's barrier spin (openmp.py)."""
