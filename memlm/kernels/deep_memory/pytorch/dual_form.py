"""The chunk loop of the deep-memory dual form (docs/design.md §3) with a hand-written backward.

For the Titans memory (ℓ2 bias ``ψ(e) = 2e``, identity retention ``W = A``) the chunked path is
one :class:`torch.autograd.Function`. Each layer's state holds ``W_l`` and ``S_l`` as the two blocks
of one tensor ``[NH, 2, d_{l−1}, d_l]``, read as ``P_l = [W_l ; S_l]`` (``[NH, 2 d_{l−1}, d_l]``), so that

* the chunk-end update ``[W' ; S'] = [β_b W + d_b S ; m_b S] − L_lᵀ Δ_l`` is one ``baddbmm`` with the left
  factor ``L_l = [G_b ⊙ X_l | n_b ⊙ X_l]`` (the rows of ``X_l`` scaled by the closing rows of ``G`` and ``n``);
* the read ``Z_l = β ⊙ (H W) + d ⊙ (H S) − (G ⊙ H X_lᵀ) Δ_l`` is ``[β ⊙ H | d ⊙ H] P_l − (G ⊙ H X_lᵀ) Δ_l``,
  one matmul against the state.

The forward runs without autograd: per chunk, the key pass at the chunk-start weights (the factors
``X_l, Δ_l`` of ``∇_{W_l} ℓ_i = X_{l,i}ᵀ Δ_{l,i}``), the read and the update; it keeps every chunk's
start state and intermediates. The backward walks the chunks in reverse carrying ``∂L/∂P_l`` (in two
buffers per layer, used in turn). The key pass is itself a backward pass of the memory at the
chunk-start weights, so the backward differentiates it (second order through φ and the LayerNorm,
:func:`_keys_vjp`). Everything runs chunk by chunk on ``[NH, b, ·]`` blocks: chunk-batched temporaries
would be fresh memory on every call, which costs more on CPU than the per-chunk calls they save.
The LayerNorms use PyTorch's fused kernels (``native_layer_norm`` and its backward); φ and its
vector-Jacobian product are :mod:`.mlp`'s. On CPU the same loop runs compiled when it can be built
(``cpu/dual_form.cpp``, :mod:`.cpu.function`); this module's loop is the fallback and the reference it is tested
against.

Layout: chunk-major, ``[C, NH, …]`` (C chunks, NH = sequences × heads).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch

from ..mlp import ACTIVATIONS, LN_EPS, Linear
from ..objectives import l2_bias
from ..spec import MemorySpec


def gelu_second(z: torch.Tensor) -> torch.Tensor:
    """``φ''(z)`` of exact GELU ``φ(z) = z Φ(z)``: ``ϕ(z) (2 − z²)`` (ϕ the standard normal density)."""
    z2 = z * z
    return torch.exp(-0.5 * z2).mul_(2 - z2).div_(math.sqrt(2 * math.pi))


SECOND_DERIVATIVES = {"gelu": gelu_second}  # activations the hand-written backward supports (φ' from mlp.py)


def implements(spec: MemorySpec, channel_wise: bool) -> bool:
    """Whether this loop (and its compiled twin) computes ``spec``'s memory: the ℓ2 bias, the identity retention,
    an activation in ``SECOND_DERIVATIVES``, per-head gates (``channel_wise`` False) and no lag token."""
    plain = (spec.bias, spec.retention) == ("l2", "none") and not spec.lag_token
    return plain and spec.activation in SECOND_DERIVATIVES and not channel_wise


def _flat(blocks: torch.Tensor) -> torch.Tensor:
    """A state ``[NH, 2, d_in, d_out]`` as ``P = [W ; S]: [NH, 2 d_in, d_out]``."""
    return blocks.flatten(1, 2)


def _scaled(h: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
    """``[c_1 ⊙ h | c_2 ⊙ h]`` (rows of ``h: […, b, d]`` scaled by ``coef: […, b, 2, 1]``): the read's
    ``[β ⊙ H | d ⊙ H]`` and the update's ``L = [G_b ⊙ X | n_b ⊙ X]``."""
    return (h.unsqueeze(-2) * coef).flatten(-2)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``⟨a_t, b_t⟩`` of every row, kept as a ``[…, 1]`` column."""
    return torch.linalg.vecdot(a, b).unsqueeze(-1)


class Coefficients(NamedTuple):
    """The coefficients of docs/design.md §3 shaped to broadcast against rows and states (``[C, NH, …]``):
    ``bd = (β, d): […, b, 2, 1]`` and ``G: […, b, b]`` for the reads; ``Gn = (G_b, n_b): […, b, 2, 1]`` (the
    closing rows), ``decay = (β_b, m_b): […, 2, 1, 1]`` and ``d_end = d_b: […, 1, 1]`` for the update."""

    bd: torch.Tensor
    G: torch.Tensor
    Gn: torch.Tensor
    decay: torch.Tensor
    d_end: torch.Tensor


def _coefficients(beta, d, G, beta_e, d_e, m_e, G_e, n_e) -> Coefficients:
    """:class:`Coefficients` from ``β, d: [C, NH, b]``, ``G: [C, NH, b, b]``, ``β_b, d_b, m_b: [C, NH]`` and
    ``G_b, n_b: [C, NH, b]``."""
    return Coefficients(
        bd=torch.stack([beta, d], -1).unsqueeze(-1),
        G=G.contiguous(),
        Gn=torch.stack([G_e, n_e], -1).unsqueeze(-1),
        decay=torch.stack([beta_e, m_e], -1)[..., None, None],
        d_end=d_e[..., None, None],
    )


class Trace(NamedTuple):
    """A forward pass of the memory MLP: what its backward needs (``[NH, b, ·]``)."""

    inputs: list[torch.Tensor]  # h_0 … h_{L−1}, the left factors of each layer's weight gradient
    pre: list[torch.Tensor]  # z_1 … z_L (z_L the input of the LayerNorm)
    ln: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (LN(z_L), mean, rstd), None without norm


def _apply(x: torch.Tensor, linear: Linear, depth: int, spec: MemorySpec) -> tuple[torch.Tensor, Trace]:
    """``M(x) = x + LN(h_L)`` of :func:`.mlp.memory_apply` with the fused LayerNorm kernel, keeping every
    pre-activation and the LayerNorm statistics for the fused backward kernels."""
    phi = ACTIVATIONS[spec.activation].fn
    h, inputs, pre = x, [], []
    for layer in range(depth):
        inputs.append(h)
        pre.append(linear(layer, h))
        if layer < depth - 1:
            h = phi(pre[-1])
    ln = torch.native_layer_norm(pre[-1], pre[-1].shape[-1:], None, None, LN_EPS) if spec.norm else None
    y = pre[-1] if ln is None else ln[0]
    return (x + y if spec.residual else y), Trace(inputs, pre, ln)


def _ln_vjp(grad: torch.Tensor, trace: Trace) -> torch.Tensor:
    """The LayerNorm's vector-Jacobian product at its input ``z_L`` (fused kernel)."""
    (_, mean, rstd), z = trace.ln, trace.pre[-1]
    mask = (True, False, False)
    return torch.ops.aten.native_layer_norm_backward(grad, z, z.shape[-1:], mean, rstd, None, None, mask)[0]


class Keys(NamedTuple):
    """One chunk's key pass at its start weights ``W_0`` (``[NH, b, ·]``)."""

    trace: Trace  # M_{W_0}(k); X_l = trace.inputs[l]
    psi: torch.Tensor  # ψ = 2 (M(k) − v)
    err: list[torch.Tensor]  # Δ_l = ∂ℓ/∂z_l
    back: list[torch.Tensor]  # Δ_{l+1} W_{l+1}ᵀ for the hidden layers
    slope: list[torch.Tensor]  # φ'(z_l) for the hidden layers: Δ_l = back_l ⊙ φ'(z_l)


def _keys(k: torch.Tensor, v: torch.Tensor, W: list[torch.Tensor], spec: MemorySpec) -> Keys:
    """``M_W(k)`` and the backward of ``ψ = 2 (M(k) − v)``: ``Δ_L = LNᵀ ψ``, ``Δ_l = (Δ_{l+1} W_{l+1}ᵀ) ⊙ φ'(z_l)``."""
    out, trace = _apply(k, lambda layer, h: torch.bmm(h, W[layer]), len(W), spec)
    psi = l2_bias(out - v)
    slope = [ACTIVATIONS[spec.activation].grad(z) for z in trace.pre[:-1]]
    err, back = [psi if trace.ln is None else _ln_vjp(psi, trace)], []
    for layer in reversed(range(len(W) - 1)):
        back.insert(0, torch.bmm(err[0], W[layer + 1].mT))
        err.insert(0, back[0] * slope[layer])
    return Keys(trace, psi, err, back, slope)


def _update(blocks: torch.Tensor, left: torch.Tensor, err: torch.Tensor, decay: torch.Tensor, d_end: torch.Tensor):
    """The chunk-end state ``[β_b W + d_b S ; m_b S] − Lᵀ Δ`` of ``blocks = (W, S)``."""
    nxt = blocks * decay
    _flat(nxt).baddbmm_(left.mT, err, alpha=-1)
    nxt[:, 0].addcmul_(blocks[:, 1], d_end)
    return nxt


class Read(NamedTuple):
    """One chunk's dual-form read (``[NH, b, ·]``)."""

    trace: Trace  # M_{W_t}(q) through the dual-form linear maps
    hx: list[torch.Tensor]  # H_{l−1} X_lᵀ (b × b)
    A: list[torch.Tensor]  # G ⊙ H_{l−1} X_lᵀ


def _read(
    q: torch.Tensor, P: list[torch.Tensor], keys: Keys, bd: torch.Tensor, G: torch.Tensor, spec: MemorySpec
) -> tuple[torch.Tensor, Read]:
    """``M_{W_t}(q_t)`` of every row with ``Z_l = [β ⊙ H | d ⊙ H] P_l − (G ⊙ H X_lᵀ) Δ_l``."""
    hx, A = [], []

    def linear(layer: int, h: torch.Tensor) -> torch.Tensor:
        hx.append(torch.bmm(h, keys.trace.inputs[layer].mT))
        A.append(G * hx[-1])
        return torch.bmm(_scaled(h, bd), P[layer]).baddbmm_(A[-1], keys.err[layer], alpha=-1)

    o, trace = _apply(q, linear, len(P), spec)
    return o, Read(trace, hx, A)


class ReadGrads(NamedTuple):
    """Backward of one chunk's :func:`_read` (``[NH, b, ·]``) except its state terms ``[β ⊙ H | d ⊙ H]ᵀ ∂Z_l``;
    per layer ``E_l = ∂Z_l Δ_lᵀ``, and signs left to the consumers."""

    dq: torch.Tensor
    d_bd: torch.Tensor  # ∂(β, d): [NH, b, 2]
    hxE: torch.Tensor  # −∂G = Σ_l H_{l−1} X_lᵀ ⊙ E_l
    dZ: list[torch.Tensor]  # ∂Z_l
    AdZ: list[torch.Tensor]  # A_lᵀ ∂Z_l = −∂Δ_l
    GE: list[torch.Tensor]  # G ⊙ E_l, so that ∂X_l = −(G ⊙ E_l)ᵀ H_{l−1}


def _read_vjp(do: torch.Tensor, P: list[torch.Tensor], keys: Keys, read: Read, bd, G, spec: MemorySpec) -> ReadGrads:
    """:class:`ReadGrads` from ``do = ∂L/∂M_{W_t}(q)``, layer by layer from the top."""
    vjp, reads, depth = ACTIVATIONS[spec.activation].vjp, read.trace, len(P)
    dz = do if reads.ln is None else _ln_vjp(do, reads)
    d_bd, hxE, dZ, AdZ, GEs = 0, 0, [None] * depth, [None] * depth, [None] * depth
    for layer in reversed(range(depth)):
        h = reads.inputs[layer]
        d_scaled = torch.bmm(dz, P[layer].mT).unflatten(-1, (2, -1))  # (∂Z Wᵀ, ∂Z Sᵀ)
        E = torch.bmm(dz, keys.err[layer].mT)
        GE = GEs[layer] = G * E
        d_bd = d_bd + torch.linalg.vecdot(d_scaled, h.unsqueeze(-2))
        hxE = hxE + read.hx[layer] * E
        dZ[layer], AdZ[layer] = dz, torch.bmm(read.A[layer].mT, dz)
        dh = (d_scaled * bd).sum(-2).baddbmm_(GE, keys.trace.inputs[layer], alpha=-1)
        if layer:
            dz = vjp(dh, reads.pre[layer - 1])
    return ReadGrads(dh + do if spec.residual else dh, d_bd, hxE, dZ, AdZ, GEs)


def _update_vjp(
    carry: list[torch.Tensor], blocks: list[torch.Tensor], keys: Keys, read: Read, Gn: torch.Tensor, r: ReadGrads
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Backward of :func:`_update` into its inputs other than the state, with the read's parts of ``∂Δ_l``,
    ``∂X_l`` added. From the carry ``∂P_l`` (blocks) and ``Λ_l = Δ_l ∂P_lᵀ``: ``⟨∂P_end, P⟩`` as the
    ``[NH, 2, 2]`` blocks ``⟨∂W', W⟩ ⟨∂W', S⟩ / ⟨∂S', W⟩ ⟨∂S', S⟩`` (so ``∂β_b, ∂d_b, ∂m_b``);
    ``∂Δ_l = −A_lᵀ ∂Z_l − L_l ∂P_l``; ``−∂X_l = (G ⊙ E_l)ᵀ H_{l−1} + Σ_s Gn_s ⊙ Λ_{l,s}``;
    ``−∂(G_b, n_b) = Σ_l ⟨Λ_{l,s}, X_l⟩: [NH, b, 2]``."""
    inner = sum(torch.bmm(db.flatten(-2), b.flatten(-2).mT) for db, b in zip(carry, blocks))
    dErr, neg_dX, neg_d_closing = [], [], 0
    for dp, x, err, h, AdZ, GE in zip(map(_flat, carry), keys.trace.inputs, keys.err, read.trace.inputs, r.AdZ, r.GE):
        dErr.append(torch.baddbmm(AdZ, _scaled(x, Gn), dp, beta=-1, alpha=-1))
        d_left = torch.bmm(err, dp.mT).unflatten(-1, (2, -1))
        neg_dX.append(torch.baddbmm((d_left * Gn).sum(-2), GE.mT, h))
        neg_d_closing = neg_d_closing + torch.linalg.vecdot(d_left, x.unsqueeze(-2))
    return inner, dErr, neg_dX, neg_d_closing


def _keys_vjp(
    a: list[torch.Tensor], e: list[torch.Tensor], W: list[torch.Tensor], keys: Keys, spec: MemorySpec
) -> tuple[torch.Tensor, torch.Tensor, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    """Backward of :func:`_keys` (second order in ``W_0``) from ``a_l = ∂L/∂Δ_l`` and ``e_l = −∂L/∂X_l``:
    ``∂k`` (``e_0`` included), ``∂L/∂(M(k) − v)`` and per layer the factor pairs ``(L, R)`` of
    ``∂W_l = Σ Lᵀ R``."""
    second, trace = SECOND_DERIVATIVES[spec.activation], keys.trace
    terms = [[] for _ in W]
    for layer in range(len(W) - 1):  # Δ_l = back_l ⊙ φ'(z_l), back_l = Δ_{l+1} W_{l+1}ᵀ
        d_back = a[layer] * keys.slope[layer]
        a[layer + 1] = torch.baddbmm(a[layer + 1], d_back, W[layer + 1])
        terms[layer + 1].append((d_back, keys.err[layer + 1]))
    if trace.ln is None:  # Δ_L = ψ
        d_err = dz = 2 * a[-1]  # ψ = 2 (M(k) − v)
    else:  # Δ_L = LN_zᵀ ψ, whose Jacobian is a function of z_L too: through y = LN(z_L) and through r(z_L)
        (y, _, r), last = trace.ln, a[-1]
        r_mean = r / y.shape[-1]
        d_err = 2 * _ln_vjp(last, trace)
        dy = torch.addcmul(d_err, last, r_mean * _rowdot(keys.psi, y), value=-1)
        dy.addcmul_(keys.psi, r_mean * _rowdot(last, y), value=-1)
        dz = _ln_vjp(dy, trace).addcmul_(y, r_mean * _rowdot(last, keys.err[-1]), value=-1)
    for layer in reversed(range(len(W))):
        terms[layer].append((trace.inputs[layer], dz))
        dh = torch.baddbmm(e[layer], dz, W[layer].mT, beta=-1)
        if layer:  # z_l enters Δ_l through φ'(z_l) and h_l = φ(z_l)
            curvature = a[layer - 1] * keys.back[layer - 1] * second(trace.pre[layer - 1])
            dz = torch.addcmul(curvature, dh, keys.slope[layer - 1])
    return dh, d_err, terms


def _state_vjp(
    dp: torch.Tensor,
    out: torch.Tensor,
    coef: tuple[torch.Tensor, torch.Tensor],
    read: tuple[torch.Tensor, torch.Tensor],
    weight_terms: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """``∂P_0 = [β_b ∂W' ; m_b ∂S' + d_b ∂W'] + [β ⊙ H | d ⊙ H]ᵀ ∂Z + [Σ Lᵀ R ; 0]`` from ``dp = (∂W', ∂S')``
    (blocks ``[NH, 2, d_in, d_out]``, ``coef = ((β_b, m_b), d_b)``), written into ``out``."""
    torch.mul(dp, coef[0], out=out)
    _flat(out).baddbmm_(read[0].mT, read[1])
    out[:, 1].addcmul_(dp[:, 0], coef[1])
    dw0 = out[:, 0]
    for left, right in weight_terms:
        dw0.baddbmm_(left.mT, right)
    return out


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


class DualFormChunks(torch.autograd.Function):
    """The chunked op on chunk-major inputs: ``q, k, v: [C, NH, b, D]``, coefficients ``β, d: [C, NH, b]``,
    ``G: [C, NH, b, b]``, closing rows ``β_b, d_b, m_b: [C, NH]``, ``G_b, n_b: [C, NH, b]`` and start
    states ``W_l, S_l: [NH, d_{l−1}, d_l]``. Returns the outputs ``[C, NH, b, D]`` and the final
    ``W_l``, ``S_l``. ``keep_tape``: whether a backward can follow; without it no chunk's tape is kept."""

    @staticmethod
    def forward(ctx: Any, spec: MemorySpec, keep_tape: bool, q, k, v, *coefficients_and_state):
        ctx.spec = spec
        coef, state = _coefficients(*coefficients_and_state[:8]), coefficients_and_state[8:]
        q, k, v = (t.contiguous() for t in (q, k, v))
        depth = len(state) // 2
        blocks = [torch.stack([w, s], 1) for w, s in zip(state[:depth], state[depth:])]
        outputs, tapes = [], []
        for qc, kc, vc, bd, G, Gn, decay, d_end in zip(q, k, v, *coef):
            keys = _keys(kc, vc, [b[:, 0] for b in blocks], spec)
            o, read = _read(qc, [_flat(b) for b in blocks], keys, bd, G, spec)
            outputs.append(o)
            if keep_tape:
                tapes.append((blocks, keys, read))
            blocks = [
                _update(b, _scaled(x, Gn), err, decay, d_end) for b, x, err in zip(blocks, keys.trace.inputs, keys.err)
            ]
        if keep_tape:  # every chunk's tape has one structure: save the leaves, rebuild chunk by chunk in the backward
            ctx.skeleton = _skeleton(tapes[0])
            ctx.save_for_backward(*coef, *(leaf for tape in tapes for leaf in _leaves(tape)))
        return torch.stack(outputs), *[b[:, 0].clone() for b in blocks], *[b[:, 1].clone() for b in blocks]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, do: torch.Tensor, *d_final: torch.Tensor):
        spec, depth = ctx.spec, len(d_final) // 2
        coef, leaves = Coefficients(*ctx.saved_tensors[:5]), iter(ctx.saved_tensors[5:])
        tapes = [_rebuild(ctx.skeleton, leaves) for _ in range(do.shape[0])]
        carry = [torch.stack([dw, ds], 1) for dw, ds in zip(d_final[:depth], d_final[depth:])]
        spare = [torch.empty_like(dp) for dp in carry]  # the carry alternates between two buffers per layer
        grads = []
        for (blocks, keys, read), do_c, bd, G, Gn, decay, d_end in reversed(list(zip(tapes, do, *coef))):
            r = _read_vjp(do_c, [_flat(b) for b in blocks], keys, read, bd, G, spec)
            inner, dErr, neg_dX, neg_d_closing = _update_vjp(carry, blocks, keys, read, Gn, r)
            dk, d_out, terms = _keys_vjp(dErr, neg_dX, [b[:, 0] for b in blocks], keys, spec)
            reads = [(_scaled(h, bd), dz) for h, dz in zip(read.trace.inputs, r.dZ)]
            carry, spare = (
                [_state_vjp(db, out, (decay, d_end), rd, t) for db, out, rd, t in zip(carry, spare, reads, terms)],
                carry,
            )
            grads.append((r.dq, dk + d_out if spec.residual else dk, d_out, r.d_bd, r.hxE, inner, neg_d_closing))
        dq, dk, d_out, d_bd, hxE, inner, neg_d_closing = (torch.stack(g[::-1]) for g in zip(*grads))
        d_closing = neg_d_closing.neg_()
        return (
            None, None, dq, dk, d_out.neg_(), d_bd[..., 0], d_bd[..., 1], hxE.neg_(),
            inner[..., 0, 0], inner[..., 0, 1], inner[..., 1, 1], d_closing[..., 0], d_closing[..., 1],
            *[dp[:, 0] for dp in carry], *[dp[:, 1] for dp in carry],
        )  # fmt: skip
