"""The linear memory on CUDA: flash-linear-attention's Triton kernels (``fla.py``)."""
