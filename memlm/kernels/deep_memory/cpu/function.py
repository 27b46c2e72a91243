"""The compiled chunk loop as an autograd function: :class:`.pytorch.dual_form.DualFormChunks` run by
``dual_form.cpp`` (same inputs, outputs and gradients; one C++ call each way)."""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..spec import MemorySpec
from .loader import load


class CompiledDualFormChunks(torch.autograd.Function):
    """:class:`.pytorch.dual_form.DualFormChunks` with the forward and backward loops in ``dual_form.cpp``
    (CPU, float32/float64, the extension loaded: ``select_path`` checks all three). ``keep_tape``: whether a
    backward can follow (the caller knows: inside ``forward`` grad mode is always off); without it the kernel
    keeps a two-chunk workspace instead of the tape and nothing is saved."""

    @staticmethod
    def forward(ctx: Any, spec: MemorySpec, keep_tape: bool, q, k, v, *coefficients_and_state):
        kernel = load()
        rows = [t.contiguous() for t in (q, k, v, *coefficients_and_state[:8])]
        state = coefficients_and_state[8:]
        depth = len(state) // 2
        o, *final, tape = kernel.forward(rows, state[:depth], state[depth:], spec.residual, spec.norm, keep_tape)
        ctx.spec, ctx.kernel = spec, kernel
        if keep_tape:
            ctx.save_for_backward(*rows, tape)
        return o, *final

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, do: torch.Tensor, *d_final: torch.Tensor):
        *rows, tape = ctx.saved_tensors
        depth = len(d_final) // 2
        dW, dS = [g.contiguous() for g in d_final[:depth]], [g.contiguous() for g in d_final[depth:]]
        return None, None, *ctx.kernel.backward(rows, tape, do, dW, dS, ctx.spec.residual, ctx.spec.norm)
