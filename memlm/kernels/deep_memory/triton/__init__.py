"""The deep-memory op in Triton: the autograd entry (``chunk.py``) over the forward (``fwd.py``) and backward
(``bwd.py``) kernels and their device functions. Imported on first use (it imports ``triton``)."""
