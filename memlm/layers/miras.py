"""Moneta, Yaad and Memora (Behrouz et al. 2025, "It's All Connected", arXiv 2504.13173 §5): the
Titans memory block (short conv, ℓ2-normalised q/k, 2-layer MLP memory, output norm and gate) with
the Miras choices set, plain GD (no momentum) and channel-wise θ, α from low-rank projections.
Each is a preset of ``titans_memory``; every option stays overridable.

* **Moneta**: ℓp attentional bias (p = 3; smooth sign ``tanh(νx)``, ``|x| ≈ sqrt(x² + ε)``) and ℓq
  retention (q = 4) on the decayed accumulator ``A_t = (1 − α_t) A_{t−1} − η_t ∇ℓ_p``. The weights are the
  mirror map of the paper's ℓq objective, ``W = sign(A)|A|^{r−1}·(mean|A|^r)^{(2−r)/r}``, r = q/(q − 1)
  (``retention: lq``); the printed ``W = A / ‖A‖_q^{q−2}`` drops the elementwise power and shrinks the
  memory as it writes (``retention: lq_norm`` keeps it; docs/design.md §4.2).
* **Yaad**: Huber attentional bias with a data-dependent threshold δ_t per token and head, switching on
  the error norm as the paper's (``huber_switch: coordinate`` switches per coordinate), and the decay α_t
  (local and global ℓ2 retention).
* **Memora**: ℓ2 bias and KL retention on a scaled simplex, ``W_t = c · Softmax((1 − α_t) log W_{t−1} − η_t ∇ℓ)``,
  c the fan-in of each layer (the paper leaves c open; c = 1 makes every weight ≈ 1/d_in, and the memory
  stores nothing), chunked with the paper's lag token (the exact step at each chunk's first token).

Two initialisation choices of ours (the paper gives none; measured in docs/design.md §4.2):
``unit_key_init`` draws the memory's first layer from N(0, 1), not N(0, 1/d): the keys are unit vectors,
so the default left the memory's pre-norm output about 16× too small and its LayerNorm amplified every
inner step by as much; and Yaad's δ_t starts at 2√d, above a fresh memory's error norm, so tokens start
in the ℓ2 branch and the ℓ1 branch takes the outliers.
"""

from __future__ import annotations

from dataclasses import dataclass

from memlm.layers.neural_memory import NeuralMemory
from memlm.layers.registry import register_mixer


@dataclass
class MirasOptions(NeuralMemory.Options):
    """What the three models share: plain GD (no momentum), channel-wise θ and α (Yaad's δ per token and head)."""

    momentum: bool = False
    gates: str = "channel"
    unit_key_init: bool = True  # ours: the first memory layer ~ N(0, 1) for unit-norm keys (module docstring)


@register_mixer("moneta")
class Moneta(NeuralMemory):
    @dataclass
    class Options(MirasOptions):
        bias: str = "lp"  # p = 3 (the kernel's default), as in the paper
        retention: str = "lq"  # q = 4 (the kernel's default), as in the paper


@register_mixer("yaad")
class Yaad(NeuralMemory):
    @dataclass
    class Options(MirasOptions):
        bias: str = "huber"


@register_mixer("memora")
class Memora(NeuralMemory):
    @dataclass
    class Options(MirasOptions):
        retention: str = "softmax"  # c = the fan-in (the kernel's default)
        lag_token: bool = True
