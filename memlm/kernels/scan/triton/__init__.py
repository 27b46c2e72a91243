"""The linear scan in Triton: our kernels (``scan.py``). Imported on first use (it imports ``triton``)."""
