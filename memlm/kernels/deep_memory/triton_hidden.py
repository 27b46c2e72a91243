"""Hidden-layer tiles of the two-layer memory ``M(x) = x + LN(φ(x W_1) W_2)`` (Titans, L = 2).

The hidden width ``d_1 = expansion · D`` is walked in tiles of ``BH`` columns so that only a
``[D, BH]`` slice of ``W_1, S_1`` and a ``[BH, D]`` slice of ``W_2, S_2`` is live at a time.
Key side (at the chunk-start weights): ``A_1 = K W_1``, ``H_k = φ(A_1)``, ``A_2 = H_k W_2``; the
back-propagated key errors are ``Δ_2`` (from :func:`key_error` on ``A_2``) and
``Δ_1 = (Δ_2 W_2ᵀ) ⊙ φ'(A_1)``. Query side: ``Z_1 = β ⊙ (Q W_1) + d ⊙ (Q S_1) − (G ⊙ Q Kᵀ) Δ_1``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import gelu, gelu_grad, mm, state_ptrs


@triton.jit
def hidden_tile_ptrs(X1, X2, slot, i_h, j, H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr,
                     BD: tl.constexpr, BH: tl.constexpr):
    """Hidden tile ``j`` of a layer-1 ``[slots, H, D, HD]`` and a layer-2 ``[slots, H, HD, D]`` state:
    pointers of the ``[D, BH]`` and ``[BH, D]`` blocks and their masks."""
    o_d = tl.arange(0, BD)
    o_h = j * BH + tl.arange(0, BH)
    p1, m1 = state_ptrs(X1, slot, i_h, H, D, HD, o_d, o_h)
    p2, m2 = state_ptrs(X2, slot, i_h, H, HD, D, o_h, o_d)
    return p1, p2, m1, m2


@triton.jit
def key_hidden_output(K, W1, W2, slot, i_h, H: tl.constexpr, D: tl.constexpr, HD: tl.constexpr,
                      BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BF16_DOT: tl.constexpr):
    """``A_2 = φ(K W_1) W_2`` summed over the hidden tiles of the state in ``slot``."""
    A2 = tl.zeros([BT, BD], tl.float32)
    for j in range(tl.cdiv(HD, BH)):
        p1, p2, m1, m2 = hidden_tile_ptrs(W1, W2, slot, i_h, j, H, D, HD, BD, BH)
        A2 += mm(gelu(mm(K, tl.load(p1, mask=m1, other=0.0), BF16_DOT)), tl.load(p2, mask=m2, other=0.0),
                 BF16_DOT)
    return A2


@triton.jit
def key_hidden_tile(K, Delta2, W1j, W2j, BF16_DOT: tl.constexpr):
    """Key side of one tile: ``(A_1, H_k, Δ_2 W_2ᵀ, Δ_1)``."""
    A1 = mm(K, W1j, BF16_DOT)
    dHk = mm(Delta2, tl.trans(W2j), BF16_DOT)
    return A1, gelu(A1), dHk, dHk * gelu_grad(A1)
