"""Chunked-scan kernel ops: naive reference, PyTorch chunked path, Triton kernels, dispatch."""

from .cached_readout import cached_readout, cached_readout_mlp  # noqa: F401
from .deep_memory import deep_memory  # noqa: F401
from .linear_memory import linear_memory  # noqa: F401
from .scan import linear_scan  # noqa: F401
