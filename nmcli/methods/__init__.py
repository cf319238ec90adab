"""Sparse training methods: how the effective weight and its gradient are formed, and the sparsifier."""
