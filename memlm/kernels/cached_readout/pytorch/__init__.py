"""The cached readout in plain PyTorch (``readout.py``): the CPU path, and the deep memory's path everywhere."""
