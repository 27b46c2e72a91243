"""The chunk loop of the deep-memory dual form (DESIGN.md §3) with a hand-written backward.

For the Titans memory (ℓ2 bias ``ψ(e) = 2e``, identity retention ``W = A``) the chunked path is
one :class:`torch.autograd.Function`. Each layer's state is one tensor ``P_l = [W_l | S_l]``
(``[NH, d_{l−1}, 2 d_l]``), so a read is one matmul ``h P_l = [h W_l | h S_l]`` and the
chunk-end update

    ``[W' | S'] = [β_b W + d_b S | m_b S] − X_lᵀ [G_b ⊙ Δ_l | n_b ⊙ Δ_l]``

is one ``baddbmm``. The forward runs without autograd and keeps every chunk's start state and
its ``b × d`` intermediates (through ``save_for_backward``); the backward walks the chunks in
reverse carrying ``∂L/∂P_l``. Each token's gradient factors ``(X_l, Δ_l)`` are themselves a
backward pass of the memory at the chunk-start weights, so the backward differentiates that pass
(second-order terms through φ and the LayerNorm, :func:`_factors_vjp`). The LayerNorm uses
PyTorch's fused kernels (``native_layer_norm`` and its backward); φ' is :mod:`.mlp`'s.

Layout: chunk-major, ``[C, NH, …]`` (C chunks, NH = sequences × heads), so each chunk is a
contiguous slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from .mlp import ACTIVATIONS, LN_EPS, Linear
from .objectives import l2_bias


def gelu_second(z: torch.Tensor) -> torch.Tensor:
    """``φ''(z)`` of exact GELU ``φ(z) = z Φ(z)``: ``ϕ(z) (2 − z²)`` (ϕ the standard normal density)."""
    z2 = z * z
    return torch.exp(-0.5 * z2).mul_(2 - z2).div_(math.sqrt(2 * math.pi))


SECOND_DERIVATIVES = {"gelu": gelu_second}  # activations the hand-written backward supports (φ' from mlp.py)


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``W`` and ``S`` halves of a ``[…, 2 d]`` tensor."""
    return t.chunk(2, dim=-1)


def _pairs(t: torch.Tensor) -> torch.Tensor:
    """``[…, 2 d] → […, 2, d]``: the ``W`` and ``S`` halves side by side."""
    return t.unflatten(-1, (2, t.shape[-1] // 2))


class EndRows(NamedTuple):
    """One chunk's closing-row coefficients, shaped to broadcast against ``[NH, b, d]`` rows and
    ``[NH, d_in, 2 d_out]`` states: ``d_b: [NH, 1, 1]``, ``Gn = (G_b, n_b): [NH, b, 2, 1]`` and per
    layer ``decay = [β_b … | m_b …]: [NH, 1, 2 d_l]``."""

    d: torch.Tensor
    Gn: torch.Tensor
    decay: list[torch.Tensor]


def _end_rows(end: tuple[torch.Tensor, ...], widths: list[int]) -> list[EndRows]:
    """Split ``(β_b, d_b, m_b: [C, NH], G_b, n_b: [C, NH, b])`` into one :class:`EndRows` per chunk."""
    beta, d, m = (x[..., None, None] for x in end[:3])
    Gn = torch.stack(end[3:], -1).unsqueeze(-1)
    decay = {w: torch.cat([beta.expand(-1, -1, 1, w), m.expand(-1, -1, 1, w)], -1) for w in set(widths)}
    per_chunk = zip(d.unbind(0), Gn.unbind(0), *(decay[w].unbind(0) for w in widths))
    return [EndRows(*row[:2], list(row[2:])) for row in per_chunk]


def _total(parts: list[torch.Tensor]) -> torch.Tensor:
    """``parts[0] + parts[1] + …``."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class Trace(NamedTuple):
    """A forward pass of the memory MLP: what its backward needs (``[…, b, ·]``)."""

    inputs: list[torch.Tensor]  # h_0 … h_{L−1}, the left factors of each layer's weight gradient
    pre: list[torch.Tensor]  # z_1 … z_L (z_L the input of the LayerNorm)
    ln: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (LN(z_L), mean, rstd), None without norm


def _apply(x: torch.Tensor, linear: Linear, mlp: dict) -> tuple[torch.Tensor, Trace]:
    """``M(x) = x + LN(h_L)`` of :func:`.mlp.memory_apply` with the fused LayerNorm kernel, keeping
    every pre-activation and the LayerNorm statistics for the fused backward kernels."""
    phi, depth = ACTIVATIONS[mlp["activation"]].fn, mlp["depth"]
    h, inputs, pre = x, [], []
    for layer in range(depth):
        inputs.append(h)
        pre.append(linear(layer, h))
        if layer < depth - 1:
            h = phi(pre[-1])
    ln = torch.native_layer_norm(pre[-1], pre[-1].shape[-1:], None, None, LN_EPS) if mlp["norm"] else None
    y = pre[-1] if ln is None else ln[0]
    return (x + y if mlp["residual"] else y), Trace(inputs, pre, ln)


def _ln_vjp(grad: torch.Tensor, trace: Trace) -> torch.Tensor:
    """The LayerNorm's vector-Jacobian product at its input ``z_L`` (fused kernel)."""
    (_, mean, rstd), z = trace.ln, trace.pre[-1]
    mask = (True, False, False)
    return torch.ops.aten.native_layer_norm_backward(grad, z, z.shape[-1:], mean, rstd, None, None, mask)[0]


class Factors(NamedTuple):
    """The keys' gradient factors at a chunk's start weights and their intermediates (``[NH, b, ·]``)."""

    keys: Trace  # M_{W_0}(k); X_l = keys.inputs[l]
    psi: torch.Tensor  # ψ = 2 (M(k) − v)
    err: list[torch.Tensor]  # Δ_l = ∂ℓ/∂z_l
    back: list[torch.Tensor]  # Δ_{l+1} W_{l+1}ᵀ for the hidden layers (Δ_l = back_l ⊙ φ'(z_l))
    slope: list[torch.Tensor]  # φ'(z_l) for the hidden layers
    writes: list[torch.Tensor]  # [G_b ⊙ Δ_l | n_b ⊙ Δ_l], the right factors of the chunk-end update


def _key_factors(k: torch.Tensor, v: torch.Tensor, W: list[torch.Tensor], mlp: dict) -> tuple:
    """``M_W(k)`` and the backward of ``ψ = 2 (M(k) − v)``: ``Δ_L = LNᵀ ψ``,
    ``Δ_l = (Δ_{l+1} W_{l+1}ᵀ) ⊙ φ'(z_l)``. Returns ``(trace, ψ, Δ, back, φ'(z_l))``."""
    phi_grad = ACTIVATIONS[mlp["activation"]].grad
    out, keys = _apply(k, lambda layer, h: h @ W[layer], mlp)
    psi = l2_bias(out - v)
    err, back, slope = (
        [psi if keys.ln is None else _ln_vjp(psi, keys)],
        [],
        [phi_grad(z) for z in keys.pre[:-1]],
    )
    for layer in reversed(range(len(W) - 1)):
        back.insert(0, err[0] @ W[layer + 1].mT)
        err.insert(0, back[0] * slope[layer])
    return keys, psi, err, back, slope


def _write(
    k: torch.Tensor,
    v: torch.Tensor,
    rows: EndRows,
    P: list[torch.Tensor],
    P_end: list[torch.Tensor],
    mlp: dict,
) -> Factors:
    """One chunk's writes: the factors ``X_l``, ``Δ_l`` of ``∇_{W_l} ℓ_i = X_{l,i}ᵀ Δ_{l,i}`` at ``W_0``
    and the chunk-end state, written into ``P_end``."""
    keys, psi, err, back, slope = _key_factors(k, v, [_halves(p)[0] for p in P], mlp)
    writes = [(e.unsqueeze(-2) * rows.Gn).flatten(-2) for e in err]
    for p, p_end, x, r, decay in zip(P, P_end, keys.inputs, writes, rows.decay):
        torch.mul(p, decay, out=p_end).baddbmm_(x.mT, r, alpha=-1)
        _halves(p_end)[0].addcmul_(_halves(p)[1], rows.d)
    return Factors(keys, psi, err, back, slope, writes)


class ReadTape(NamedTuple):
    """The dual-form read's intermediates (``[NH, b, ·]``)."""

    trace: Trace  # M_{W_t}(q) through the dual-form linear maps
    hp: list[torch.Tensor]  # H_{l−1} P_l = [H W_l | H S_l]
    hx: list[torch.Tensor]  # H_{l−1} X_lᵀ (b × b)


def _read(
    q: torch.Tensor,
    P: list[torch.Tensor],
    X: list[torch.Tensor],
    err: list[torch.Tensor],
    coef: tuple[torch.Tensor, ...],
    mlp: dict,
) -> tuple[torch.Tensor, ReadTape]:
    """``M_{W_t}(q_t)`` of every row with ``Z_l = β ⊙ (H P_l)_W + d ⊙ (H P_l)_S − (G ⊙ H X_lᵀ) Δ_l``."""
    bd, G = coef
    hp, hx = [], []

    def linear(layer: int, h: torch.Tensor) -> torch.Tensor:
        hp.append(h @ P[layer])
        hx.append(h @ X[layer].mT)
        return torch.baddbmm((_pairs(hp[-1]) * bd).sum(-2), G * hx[-1], err[layer], alpha=-1)

    o, trace = _apply(q, linear, mlp)
    return o, ReadTape(trace, hp, hx)


def _read_vjp(
    do: torch.Tensor,
    P: list[torch.Tensor],
    X: list[torch.Tensor],
    err: list[torch.Tensor],
    coef: tuple[torch.Tensor, ...],
    tape: ReadTape,
    mlp: dict,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], list[torch.Tensor], list[torch.Tensor], list[tuple]]:
    """Backward of :func:`_read`: ``∂Q``, ``∂(β, d, G)``, ``∂X_l``, ``∂Δ_l`` and per layer the factors
    ``(H, [β ∂Z | d ∂Z])`` of ``∂P_l = Hᵀ [β ∂Z | d ∂Z]``."""
    bd, G = coef
    reads, phi_grad = tape.trace, ACTIVATIONS[mlp["activation"]].grad
    depth = mlp["depth"]
    dq = do if mlp["residual"] else 0
    dz = do if reads.ln is None else _ln_vjp(do, reads)
    d_bd, dG = [], []
    dX, dErr, terms = [None] * depth, [None] * depth, [None] * depth
    for layer in reversed(range(depth)):
        h, hx = reads.inputs[layer], tape.hx[layer]
        d_bd.append((_pairs(tape.hp[layer]) * dz.unsqueeze(-2)).sum(-1))  # (∂Z·HW, ∂Z·HS) per row
        E = dz @ err[layer].mT
        dG.append(hx * E)
        GE = G * E
        dz_cat = (dz.unsqueeze(-2) * bd).flatten(-2)  # [β ∂Z | d ∂Z]
        terms[layer] = (h, dz_cat)
        dX[layer] = -(GE.mT @ h)
        dErr[layer] = -((G * hx).mT @ dz)
        dh = torch.baddbmm(dz_cat @ P[layer].mT, GE, X[layer], alpha=-1)
        if layer:
            dz = dh * phi_grad(reads.pre[layer - 1])
        else:
            dq = dq + dh
    d_bd = _total(d_bd)
    return dq, (d_bd[..., 0], d_bd[..., 1], -_total(dG)), dX, dErr, terms


def _update_vjp(
    dP_end: list[torch.Tensor],
    P: list[torch.Tensor],
    f: Factors,
    rows: EndRows,
    dX: list[torch.Tensor],
    dErr: list[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor], tuple[torch.Tensor, ...]]:
    """Backward of the chunk-end update ``P_end = [β_b W + d_b S | m_b S] − X_lᵀ [G_b Δ_l | n_b Δ_l]``
    into ``∂X_l``, ``∂Δ_l`` (added to the reads' ``dX``, ``dErr``) and ``∂(β_b, d_b, m_b, G_b, n_b)``."""
    dX_all, dErr_all, d_bm, d_d, d_Gn = [], [], [], [], []
    for dp, p, x, e, r, dx, de in zip(dP_end, P, f.keys.inputs, f.err, f.writes, dX, dErr):
        d_bm.append(_pairs((dp * p).sum(-2)).sum(-1))  # ⟨∂W', W⟩, ⟨∂S', S⟩
        d_d.append((_halves(dp)[0] * _halves(p)[1]).sum((-2, -1)))  # ⟨∂W', S⟩
        dr = _pairs(x @ dp)  # −∂[G_b Δ | n_b Δ]
        dX_all.append(torch.baddbmm(dx, r, dp.mT, alpha=-1))
        dErr_all.append(de - (dr * rows.Gn).sum(-2))
        d_Gn.append((dr * e.unsqueeze(-2)).sum(-1))
    d_bm, d_Gn = _total(d_bm), -_total(d_Gn)
    return dX_all, dErr_all, (d_bm[..., 0], _total(d_d), d_bm[..., 1], d_Gn[..., 0], d_Gn[..., 1])


def _factors_vjp(
    P: list[torch.Tensor], f: Factors, dX: list[torch.Tensor], dErr: list[torch.Tensor], mlp: dict
) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Backward of :func:`_key_factors` (the inputs ``X_l`` and the memory's backward pass ``Δ_l`` of
    ``ψ = 2 (M(k) − v)`` at ``W_0``, so second order in ``W_0``): ``∂K``, ``∂V`` and per layer the
    factor pairs ``(L, R)`` of ``∂W_0 = Σ Lᵀ R``."""
    second = SECOND_DERIVATIVES[mlp["activation"]]
    W = [_halves(p)[0] for p in P]
    terms = [[] for _ in W]
    dz_second = []
    for layer in range(len(W) - 1):  # Δ_l = (Δ_{l+1} W_{l+1}ᵀ) ⊙ φ'(z_l)
        d_back = dErr[layer] * f.slope[layer]
        dz_second.append(dErr[layer] * f.back[layer] * second(f.keys.pre[layer]))
        dErr[layer + 1] = torch.baddbmm(dErr[layer + 1], d_back, W[layer + 1])
        terms[layer + 1].append((d_back, f.err[layer + 1]))
    a, psi = dErr[-1], f.psi  # ∂L/∂Δ_L with Δ_L = LN_zᵀ ψ: LN's Jacobian at z_L is a function of z_L too
    if f.keys.ln is None:
        dpsi, dy = a, 0
    else:
        y, r = f.keys.ln[0], f.keys.ln[2]
        dpsi = _ln_vjp(a, f.keys)
        dy = -r * (a * (psi * y).mean(-1, keepdim=True) + psi * (a * y).mean(-1, keepdim=True))
    dout = 2 * dpsi  # ψ = 2 (M(k) − v)
    dk, dv = (dout if mlp["residual"] else 0), -dout
    dy = dy + dout
    if f.keys.ln is None:
        dz = dy
    else:  # through y = LN(z_L) and through r(z_L) in Δ_L: ∂r/∂z = −r² y / D, ∂L/∂r = (a·Δ_L) / r
        dz = _ln_vjp(dy, f.keys) - (r * (a * f.err[-1]).mean(-1, keepdim=True)) * y
    for layer in reversed(range(len(W))):
        terms[layer].append((f.keys.inputs[layer], dz))
        dh = torch.baddbmm(dX[layer], dz, W[layer].mT)
        if layer:
            dz = torch.addcmul(dz_second[layer - 1], dh, f.slope[layer - 1])
        else:
            dk = dk + dh
    return dk, dv, terms


def _state_vjp(
    dp: torch.Tensor,
    rows: EndRows,
    layer: int,
    read: tuple[torch.Tensor, torch.Tensor],
    weight_terms: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """``∂P_0 = ∂P_end ⊙ [β_b | m_b] + [0 | d_b ∂W_end] + H_readᵀ R_read + [Σ Lᵀ R | 0]``."""
    dp0 = dp * rows.decay[layer]
    dw0, ds0 = _halves(dp0)
    ds0.addcmul_(_halves(dp)[0], rows.d)
    dp0.baddbmm_(read[0].mT, read[1])
    dw0.baddbmm_(torch.cat([h for h, _ in weight_terms], -2).mT, torch.cat([r for _, r in weight_terms], -2))
    return dp0


def _leaves(tree: Any) -> list[torch.Tensor | None]:
    """The tensors (and ``None`` fields) of nested tuples, named tuples and lists, depth first."""
    if tree is None or isinstance(tree, torch.Tensor):
        return [tree]
    return [leaf for child in tree for leaf in _leaves(child)]


def _skeleton(tree: Any) -> Any:
    """``tree`` with every leaf replaced by ``None`` (its structure, for :func:`_rebuild`)."""
    if tree is None or isinstance(tree, torch.Tensor):
        return None
    children = [_skeleton(child) for child in tree]
    return type(tree)(*children) if hasattr(tree, "_fields") else type(tree)(children)


def _rebuild(skeleton: Any, leaves: Iterator[torch.Tensor | None]) -> Any:
    """Inverse of :func:`_leaves` for a tree with the structure ``skeleton``."""
    if skeleton is None:
        return next(leaves)
    children = [_rebuild(child, leaves) for child in skeleton]
    return type(skeleton)(*children) if hasattr(skeleton, "_fields") else type(skeleton)(children)


def _read_coefficients(
    beta: torch.Tensor, d: torch.Tensor, G: torch.Tensor
) -> list[tuple[torch.Tensor, ...]]:
    """Per chunk ``((β, d): [NH, b, 2, 1], G: [NH, b, b])`` from ``β, d: [C, NH, b]``,
    ``G: [C, NH, b, b]``."""
    return list(zip(torch.stack([beta, d], -1).unsqueeze(-1).unbind(0), G.unbind(0)))


class DualFormChunks(torch.autograd.Function):
    """The chunked op on chunk-major inputs: ``q, k, v: [C, NH, b, D]``, coefficients ``β, d: [C, NH, b]``,
    ``G: [C, NH, b, b]``, closing rows ``β_b, d_b, m_b: [C, NH]``, ``G_b, n_b: [C, NH, b]`` and start
    states ``W_l, S_l: [NH, d_{l−1}, d_l]``. Returns the outputs ``[C, NH, b, D]`` and the final
    ``W_l``, ``S_l``."""

    @staticmethod
    def forward(ctx: Any, mlp: dict, q, k, v, beta, d, G, *end_and_state):
        end, state, depth = end_and_state[:5], end_and_state[5:], mlp["depth"]
        P = [torch.cat([w, s], -1) for w, s in zip(state[:depth], state[depth:])]
        chunks = zip(
            q, k, v, _read_coefficients(beta, d, G), _end_rows(end, [w.shape[-1] for w in state[:depth]])
        )
        starts, tapes, outputs = [], [], []
        for qc, kc, vc, coef, rows in chunks:
            P_end = [torch.empty_like(p) for p in P]
            f = _write(kc, vc, rows, P, P_end, mlp)
            o, read_tape = _read(qc, P, f.keys.inputs, f.err, coef, mlp)
            starts.append(P)
            tapes.append((f, read_tape))
            outputs.append(o)
            P = P_end
        # every chunk's tape has one structure: save the leaves, rebuild chunk by chunk in the backward
        ctx.mlp, ctx.skeleton = mlp, _skeleton((starts[0], tapes[0]))
        ctx.save_for_backward(
            beta, d, G, *end, *(leaf for tape in zip(starts, tapes) for leaf in _leaves(tape))
        )
        finals = [_halves(p) for p in P]
        return (
            torch.stack(outputs),
            *[w.contiguous() for w, _ in finals],
            *[s.contiguous() for _, s in finals],
        )

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, do: torch.Tensor, *d_final: torch.Tensor):
        mlp, depth = ctx.mlp, ctx.mlp["depth"]
        beta, d, G, *rest = ctx.saved_tensors
        end, leaves = rest[:5], iter(rest[5:])
        starts, tapes = zip(*[_rebuild(ctx.skeleton, leaves) for _ in range(beta.shape[0])])
        dP = [torch.cat([dw, ds], -1) for dw, ds in zip(d_final[:depth], d_final[depth:])]
        coefs, end_rows = (
            _read_coefficients(beta, d, G),
            _end_rows(end, [g.shape[-1] for g in d_final[:depth]]),
        )
        grads = []
        for c in reversed(range(len(tapes))):
            P, (f, read_tape), rows = starts[c], tapes[c], end_rows[c]
            dq, d_read, dX, dErr, read_terms = _read_vjp(
                do[c], P, f.keys.inputs, f.err, coefs[c], read_tape, mlp
            )
            dX, dErr, d_end = _update_vjp(dP, P, f, rows, dX, dErr)
            dk, dv, weight_terms = _factors_vjp(P, f, dX, dErr, mlp)
            dP = [_state_vjp(dP[l], rows, l, read_terms[l], weight_terms[l]) for l in range(depth)]
            grads.append((dq, dk, dv, *d_read, *d_end))
        stacked = [torch.stack(g[::-1]) for g in zip(*grads)]
        d_state = [_halves(p) for p in dP]
        return (None, *stacked, *[w for w, _ in d_state], *[s for _, s in d_state])
