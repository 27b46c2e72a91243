"""The memory function of Titans/Miras: an MLP whose weights are the recurrent state.

``h_0 = x``; ``h_l = φ(z_l)`` with ``z_l = h_{l−1} W_l`` for ``l < L``; ``h_L = z_L``;
``M(x) = x + LN(h_L)`` (residual, affine-free LayerNorm), each part optional
(the Titans memory, arXiv 2501.00663; ``L = 1`` without residual and norm is linear memory).

The per-layer linear map is a parameter so that one function serves both reads of the
chunked path: plain weights (``h W_l``) and the dual-form read through ``W_t`` (decayed
``W_0`` plus outer-product corrections). :func:`memory_backward` back-propagates an output
gradient to every layer's pre-activation, giving the right factor of each weight gradient.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .spec import MemorySpec

LN_EPS = 1e-5


class Activation(NamedTuple):
    """An elementwise nonlinearity φ and its vector-Jacobian product ``vjp(g, z) = g ⊙ φ'(z)``."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    vjp: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def grad(self, z: torch.Tensor) -> torch.Tensor:
        """``φ'(z)``."""
        return self.vjp(torch.ones_like(z), z)


def gelu_vjp(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``g ⊙ φ'(z)`` of exact GELU ``φ(z) = z Φ(z)``, ``φ'(z) = Φ(z) + z ϕ(z)`` (ϕ the standard normal
    density), in one fused kernel (PyTorch's GELU backward, itself differentiable)."""
    return torch.ops.aten.gelu_backward(g, z)


ACTIVATIONS: dict[str, Activation] = {"gelu": Activation(F.gelu, gelu_vjp)}

Linear = Callable[[int, torch.Tensor], torch.Tensor]


class MemoryTrace(NamedTuple):
    """What :func:`memory_backward` needs from a forward pass."""

    inputs: list[torch.Tensor]  # h_0 … h_{L−1}: the left factors of each layer's weight gradient
    pre: list[torch.Tensor]  # z_1 … z_{L−1}: pre-activations of the hidden layers
    normed: torch.Tensor | None  # LN(h_L), None without norm
    rstd: torch.Tensor | None  # 1 / sqrt(Var(h_L) + eps), None without norm


def memory_apply(x: torch.Tensor, linear: Linear, depth: int, spec: MemorySpec) -> tuple[torch.Tensor, MemoryTrace]:
    """``M(x)`` of ``spec``'s memory (φ, residual, norm) with layer ``l`` computed as ``z_l = linear(l, h_{l−1})``,
    and its trace."""
    phi = ACTIVATIONS[spec.activation].fn
    h, inputs, pre = x, [], []
    for layer in range(depth):
        inputs.append(h)
        h = linear(layer, h)
        if layer < depth - 1:
            pre.append(h)
            h = phi(h)
    normed = rstd = None
    if spec.norm:
        centred = h - h.mean(-1, keepdim=True)
        rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + LN_EPS)
        h = normed = centred * rstd
    return (x + h if spec.residual else h), MemoryTrace(inputs, pre, normed, rstd)


def memory_backward(
    grad: torch.Tensor, weights: Sequence[torch.Tensor], trace: MemoryTrace, spec: MemorySpec
) -> list[torch.Tensor]:
    """``Δ_l = ∂ℓ/∂z_l`` for every layer from ``grad = ∂ℓ/∂M(x)`` (chain rule through the
    affine-free LayerNorm, ``W_l`` and φ), so that ``∇_{W_l} ℓ = h_{l−1}ᵀ Δ_l``."""
    if trace.normed is not None:
        y = trace.normed
        grad = trace.rstd * (grad - grad.mean(-1, keepdim=True) - y * (grad * y).mean(-1, keepdim=True))
    vjp = ACTIVATIONS[spec.activation].vjp
    deltas = [grad]
    for layer in range(len(weights) - 1, 0, -1):
        grad = vjp(grad @ weights[layer].mT, trace.pre[layer - 1])
        deltas.append(grad)
    return deltas[::-1]


def weight_linear(weights: Sequence[torch.Tensor]) -> Linear:
    """The plain read ``z_l = h W_l`` (``h: [..., n, d_{l−1}]``, ``W_l: [..., d_{l−1}, d_l]``)."""
    return lambda layer, h: h @ weights[layer]
