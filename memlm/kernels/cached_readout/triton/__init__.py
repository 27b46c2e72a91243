"""The matrix-memory cached readout in Triton (``readout.py``): forward and backward kernels and their
autograd entry. Imported on first use (it imports ``triton``)."""
