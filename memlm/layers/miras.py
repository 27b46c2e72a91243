"""Moneta, Yaad and Memora (Behrouz et al. 2025, "It's All Connected", arXiv 2504.13173 §5): the
Titans memory block (short conv, ℓ2-normalised q/k, 2-layer MLP memory, output norm and gate) with
the Miras choices set, plain GD (no momentum) and channel-wise η, α, δ from low-rank projections.
Each is a preset of ``titans_memory``; every option stays overridable.

* **Moneta**: ℓp attentional bias (p = 3; smooth sign ``tanh(νx)``, ``|x| ≈ sqrt(x² + ε)``) and ℓq
  retention ``W = A / ‖A‖_q^{q−2}`` (q = 4) on the decayed accumulator ``A_t = (1 − α_t) A_{t−1} − η_t ∇ℓ_p``.
* **Yaad**: Huber attentional bias with a data-dependent threshold δ_t (channel-wise here) and the
  decay α_t (local and global ℓ2 retention).
* **Memora**: ℓ2 bias and KL retention on a scaled simplex, ``W_t = c · Softmax((1 − α_t) log W_{t−1} − η_t ∇ℓ)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from memlm.layers.neural_memory import NeuralMemory
from memlm.layers.registry import register_mixer


@dataclass
class MirasOptions(NeuralMemory.Options):
    """What the three models share: plain GD (no momentum), channel-wise η, α, δ."""

    momentum: bool = False
    gates: str = "channel"


@register_mixer("moneta")
class Moneta(NeuralMemory):
    @dataclass
    class Options(MirasOptions):
        bias: str = "lp"  # p = 3 (the kernel's default), as in the paper
        retention: str = "lq_norm"  # q = 4 (the kernel's default), as in the paper


@register_mixer("yaad")
class Yaad(NeuralMemory):
    @dataclass
    class Options(MirasOptions):
        bias: str = "huber"


@register_mixer("memora")
class Memora(NeuralMemory):
    @dataclass
    class Options(MirasOptions):
        retention: str = "softmax"  # c = 1 (the kernel's default)
