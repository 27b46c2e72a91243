"""Chunked-scan kernel ops: naive reference, PyTorch chunked path, Triton kernels, dispatch."""

from .deep_memory import deep_memory  # noqa: F401
from .linear_memory import linear_memory  # noqa: F401
from .scan import linear_scan  # noqa: F401
