"""Naive deep-memory recurrence: one token at a time, straight from the Titans equations.

This is the definition of correctness for the chunked PyTorch and Triton paths. Slow by
design; float64-capable; its outputs are differentiable with respect to every input
(the per-token gradients are taken with ``torch.func.vjp``, which composes with autograd).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._common import segments
from .mlp import memory_apply, weight_linear
from .objectives import BIASES, RETENTIONS
from .state import gates_or_defaults, initial_state

State = tuple[list[torch.Tensor], list[torch.Tensor]]


def deep_memory_naive(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lr: torch.Tensor,
    momentum: torch.Tensor | None,
    forget: torch.Tensor | None,
    weights: Sequence[torch.Tensor],
    *,
    chunk_size: int = 16,
    residual: bool = True,
    norm: bool = True,
    activation: str = "gelu",
    bias: str = "l2",
    retention: str = "none",
    initial_momentum: Sequence[torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, State | None]:
    """Titans memory update (arXiv 2501.00663) with chunked gradients, one token at a time:

    ``u_t = ∇_W ℓ(W_c; k_t, v_t) = (∂M/∂W)ᵀ ψ(M_{W_c}(k_t) − v_t)`` at the weights ``W_c`` of the
    end of the previous chunk of ``chunk_size`` tokens (after the retention transform);
    ``S_t = η_t S_{t−1} − θ_t u_t``; ``W_t = (1 − α_t) W_{t−1} + S_t``; ``o_t = M_{W_t}(q_t)``.

    Shapes: ``q, k, v: [B, T, H, D]``; ``lr, momentum, forget: [B, T, H]``; ``weights[l]``:
    ``[H, d_{l−1}, d_l]`` or ``[N, H, d_{l−1}, d_l]``. Returns ``(o, (W_T, S_T))``.
    """
    theta, eta, alpha = gates_or_defaults(lr, momentum, forget)
    psi, retain = BIASES[bias], RETENTIONS[retention]
    depth = len(weights)
    B, T = q.shape[:2]
    n_seq = B if cu_seqlens is None else cu_seqlens.numel() - 1
    W_all, S_all = initial_state(weights, initial_momentum, n_seq)

    def M(x: torch.Tensor, W: Sequence[torch.Tensor]) -> torch.Tensor:
        out, _ = memory_apply(x, weight_linear(W), depth, activation=activation, residual=residual, norm=norm)
        return out

    outputs, finals_W, finals_S = [], [], []
    for i, (start, end) in enumerate(segments(cu_seqlens, T)):
        rows = slice(None) if cu_seqlens is None else slice(i, i + 1)
        batch = slice(None) if cu_seqlens is None else slice(0, 1)
        W = [w[rows] for w in W_all]
        S = [s[rows] for s in S_all]
        for t in range(start, end):
            if (t - start) % chunk_size == 0:
                W_c = W
            k_t, v_t, q_t = (x[batch, t].unsqueeze(-2) for x in (k, v, q))
            m_t, vjp = torch.func.vjp(lambda *ws, k_t=k_t: M(k_t, ws), *W_c)
            u = vjp(psi(m_t - v_t))
            th, et, al = (g[batch, t, :, None, None] for g in (theta, eta, alpha))
            S = [et * s - th * u_l for s, u_l in zip(S, u)]
            W = [(1 - al) * w + s for w, s in zip(W, S)]
            outputs.append(M(q_t, W).squeeze(-2))
            if (t - start + 1) % chunk_size == 0 or t == end - 1:
                W = [retain(w) for w in W]
        finals_W.append(W)
        finals_S.append(S)

    o = torch.stack(outputs, dim=1)
    if not output_final_state:
        return o, None
    return o, ([torch.cat(ws) for ws in zip(*finals_W)], [torch.cat(ss) for ss in zip(*finals_S)])
