"""CPU kernels of our own, each beside the plain PyTorch product it replaces (tests/test_small_gemm.py)."""
