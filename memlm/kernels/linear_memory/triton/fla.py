"""The CUDA path of the linear memory: flash-linear-attention's Triton kernels (fla 0.6).

Each family of ``naive.py`` maps to one fla op with the same layout (``[B, T, H, D]``, state
``[N, H, K, V]``, log-space decays, ``scale`` default ``K**-0.5``, no l2-norm inside unless
asked, which memlm never does):

    no β, scalar or no decay  →  chunk_simple_gla        (g=None is plain linear attention)
    no β, channel decay gk    →  chunk_gla               (with g: gk + g, the same D_t)
    β, no decay               →  chunk_delta_rule        (float16/bfloat16; it refuses float32,
                                                           which goes to the gated op with g = 0)
    β, scalar decay g         →  chunk_gated_delta_rule

Decoding rule: when ``T ≤ FUSED_RECURRENT_MAX_T`` and no gradient can flow (autograd disabled,
or no input requires one: a decoding step or a short prefill), the ``fused_recurrent_*`` twins
are used; they step the state token by token with no chunk padding (fla's own layers switch
at 64), and the gated-delta-rule one has no backward, hence the gradient condition.
fla is imported only here, on first use: it is a CUDA dependency.
"""

from __future__ import annotations

import torch

FUSED_RECURRENT_MAX_T = 64


def use_fused_recurrent(*tensors: torch.Tensor | None) -> bool:
    """The decoding rule of the module docstring (``tensors[0]`` is q)."""
    short = tensors[0].shape[1] <= FUSED_RECURRENT_MAX_T
    no_grad = not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)
    return short and no_grad


def fla_linear_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None,
    gk: torch.Tensor | None,
    beta: torch.Tensor | None,
    scale: float,
    initial_state: torch.Tensor | None,
    output_final_state: bool,
    cu_seqlens: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run the recurrence of ``naive.py`` with the fla kernel of its family (see module docstring)."""
    recurrent = use_fused_recurrent(q, k, v, g, gk, beta, initial_state)
    k, v = k.to(q.dtype), v.to(q.dtype)  # fla requires one dtype for q, k, v
    common = {
        "scale": scale,
        "initial_state": None if initial_state is None else initial_state.float(),
        "output_final_state": output_final_state,
        "cu_seqlens": None if cu_seqlens is None else cu_seqlens.long(),
    }
    if beta is not None:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

        if recurrent:
            return fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **common)
        if g is None and q.dtype != torch.float32:
            return chunk_delta_rule(q, k, v, beta, chunk_size=chunk_size, **common)
        g = torch.zeros_like(beta) if g is None else g
        return chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size, **common)
    if gk is not None:
        from fla.ops.gla import chunk_gla, fused_recurrent_gla

        gk = gk if g is None else gk + g[..., None]
        if recurrent:
            return fused_recurrent_gla(q, k, v, gk=gk, **common)
        return chunk_gla(q, k, v, gk, **common)
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    if recurrent:
        return fused_recurrent_simple_gla(q, k, v, g=g, **common)
    return chunk_simple_gla(q, k, v, g=g, chunk_size=chunk_size, **common)
