"""The linear memory in plain PyTorch: the chunk-parallel form (``chunk.py``), the CPU path."""
