"""The linear scan in plain PyTorch: the vectorised doubling scan (``chunk.py``), the CPU path."""
