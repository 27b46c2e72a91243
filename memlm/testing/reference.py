"""Test-only references written independently of memlm's kernels: the Titans memory function
and its per-token online gradient descent, from the equations."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def memory_fn(x: torch.Tensor, weights: list[torch.Tensor], residual: bool, norm: bool) -> torch.Tensor:
    """Titans memory ``M(x)`` (row vectors): GELU between layers, affine-free LayerNorm, residual."""
    h = x
    for i, w in enumerate(weights):
        h = h @ w
        if i < len(weights) - 1:
            h = F.gelu(h)
    if norm:
        h = F.layer_norm(h, h.shape[-1:])
    return x + h if residual else h


def online_gd(
    x: dict, residual: bool, norm: bool
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Titans' per-token online GD from the equations (chunk size 1), one (sequence, head) at a time:
    ``u = ∇_W ‖M(k_t) − v_t‖²`` at the current W, ``S = η_t S − θ_t u``, ``W = (1 − α_t) W + S``,
    ``o_t = M_W(q_t)``. ``x`` holds ``q, k, v [B, T, H, D]``, gates ``lr, momentum, forget`` per head
    ``[B, T, H]`` or per output unit of every layer ``[B, T, H, Σ_l d_l]``, ``weights`` and ``s0``
    (per layer ``[H, d_in, d_out]``). Returns ``o`` and the final ``W``, ``S`` (``[B, H, d_in, d_out]``)."""
    B, T, H, D = x["q"].shape
    widths = [w.shape[-1] for w in x["weights"]]

    def per_layer(gate: torch.Tensor) -> list[torch.Tensor]:
        return [gate] * len(widths) if gate.dim() == 0 else list(gate.split(widths))

    o = torch.zeros_like(x["q"])
    W_T, S_T = [], []
    for b in range(B):
        for h in range(H):
            w = [t[h] for t in x["weights"]]
            s = [t[h] for t in x["s0"]]
            for t in range(T):
                loss = (memory_fn(x["k"][b, t, h], w, residual, norm) - x["v"][b, t, h]).pow(2).sum()
                u = torch.autograd.grad(loss, w, create_graph=True)
                theta, eta, alpha = (per_layer(x[n][b, t, h]) for n in ("lr", "momentum", "forget"))
                s = [e * s_l - th * u_l for e, th, s_l, u_l in zip(eta, theta, s, u)]
                w = [(1 - a) * w_l + s_l for a, w_l, s_l in zip(alpha, w, s)]
                o[b, t, h] = memory_fn(x["q"][b, t, h], w, residual, norm)
            W_T.append(w)
            S_T.append(s)
    stack = [torch.stack(layer).unflatten(0, (B, H)) for layer in (*zip(*W_T), *zip(*S_T))]
    return o, stack[: len(widths)], stack[len(widths):]
