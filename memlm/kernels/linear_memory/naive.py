"""Per-token reference of the linear (matrix) memory: the definition of correctness.

Row-vector convention, state ``S ∈ R^{K×V}`` per head, decays in log space:

    D_t = exp(g_t) · diag(exp(gk_t))                         (a missing term is 1)
    no β:    S_t = D_t S_{t−1} + k_tᵀ v_t                     (linear attention, RetNet, Mamba2, GLA)
    with β:  S'_t = D_t S_{t−1};  S_t = S'_t + β_t k_tᵀ (v_t − k_t S'_t)   (DeltaNet, Gated DeltaNet)
    o_t = scale · q_t S_t

Written as a plain loop so that every input is differentiable by autograd; float64 inputs
stay float64, anything else is accumulated in float32.
"""

from __future__ import annotations

import torch

from .._common import segments
from .utils import accumulation_dtype


def naive_linear_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    gk: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The recurrence of the module docstring, one token at a time.

    Shapes: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, g and beta ``[B, T, H]``, gk ``[B, T, H, K]``,
    initial_state ``[N, H, K, V]``. Returns ``o [B, T, H, V]`` (dtype of q) and the final state
    ``[N, H, K, V]`` (accumulation dtype) or None.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype, dtype = q.dtype, accumulation_dtype(q)
    scale = K**-0.5 if scale is None else scale
    q, k, v = (x.to(dtype) for x in (q, k, v))
    g, gk, beta = (None if x is None else x.to(dtype) for x in (g, gk, beta))

    outputs, finals = [], []
    for i, (bos, eos) in enumerate(segments(cu_seqlens, T)):
        rows = slice(None) if cu_seqlens is None else slice(i, i + 1)
        if initial_state is None:
            S = q.new_zeros(B if cu_seqlens is None else 1, H, K, V)
        else:
            S = initial_state[rows].to(dtype)
        for t in range(bos, eos):
            if g is not None:
                S = S * g[:, t, :, None, None].exp()
            if gk is not None:
                S = S * gk[:, t, :, :, None].exp()
            k_t, v_t = k[:, t], v[:, t]
            if beta is not None:
                v_t = beta[:, t, :, None] * (v_t - torch.einsum("bhk,bhkv->bhv", k_t, S))
            S = S + k_t[..., :, None] * v_t[..., None, :]
            outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        finals.append(S)
    o = torch.stack(outputs, dim=1).to(out_dtype)
    return o, (torch.cat(finals, dim=0) if output_final_state else None)
