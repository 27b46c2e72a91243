"""The loader of the compiled CPU chunk loop (``dual_form.cpp``, run by :mod:`.cpu.function`).

Built on first use with ``torch.utils.cpp_extension`` (about 35 s with g++, cached under
``~/.cache/torch_extensions``; ``TORCH_EXTENSIONS_DIR`` moves it). It links against the BLAS and vector-math
routines inside PyTorch's own CPU library (MKL on x86-64). Where it cannot be built or loaded (no C++
compiler, another BLAS), :func:`load` warns once and returns ``None`` and the op runs its PyTorch chunk
loop, with the same results. ``MEMLM_CPU_KERNEL=0`` turns the kernel off. Which inputs it serves is
decided by ``select_path`` (``memlm.kernels.deep_memory``) from ``DTYPES``, ``ACTIVATIONS``, :func:`enabled`
and :func:`load`.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("dual_form.cpp")
DTYPES = (torch.float32, torch.float64)
ACTIVATIONS = ("gelu",)  # the activations φ the compiled loop implements


def enabled() -> bool:
    """Whether ``MEMLM_CPU_KERNEL`` allows the compiled kernel (default: yes)."""
    value = os.environ.get("MEMLM_CPU_KERNEL", "1")
    if value not in ("0", "1"):
        raise ValueError(f"MEMLM_CPU_KERNEL={value!r} is not one of ('0', '1')")
    return value == "1"


@functools.cache
def load() -> ModuleType | None:
    """The compiled extension, built on the first call; ``None`` (and a warning, once) where it cannot be."""
    from torch.utils.cpp_extension import load as build

    vector = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    flags = ["-O3", "-fopenmp", *(["-mavx2", "-mfma"] if vector else [])]
    try:
        return build(name="memlm_dual_form" + ("_avx2" if vector else ""), sources=[str(SOURCE)], extra_cflags=flags)
    except Exception as error:  # no compiler, no BLAS symbols: the PyTorch loop serves instead
        warnings.warn(
            f"memlm: the compiled CPU deep-memory kernel is unavailable ({type(error).__name__}: {error}); "
            "using the PyTorch chunk loop (same results, about 2x slower on CPU)",
            stacklevel=4,
        )
        return None
