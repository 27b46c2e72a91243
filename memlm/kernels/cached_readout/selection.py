"""The read weights of the cached readout, vectorised: visibility, top-k selection and renormalisation.

For a token ``t`` with ``v_t`` visible caches (``I_t = {0, …, v_t − 1}``) and given weights ``γ_{t,i}`` (per
head), the weights the readout applies are (docs/design.md §4.4):

* ``top_k`` None or ``≥ v_t``: ``γ'_{t,i} = γ_{t,i}`` for ``i ∈ I_t``;
* otherwise ``J_t`` = the ``top_k`` caches of ``I_t`` with the largest ``γ_{t,i}`` (ties: the lower index first),
  and ``γ'_{t,i} = γ_{t,i}`` on ``J_t`` (``renormalize=False``) or ``γ_{t,i} · Σ_{I_t} γ / Σ_{J_t} γ`` on ``J_t``
  (``renormalize=True``: the dropped mass is spread over the kept caches in proportion; factor 1 where
  ``Σ_{J_t} γ = 0``);
* ``γ'_{t,i} = 0`` everywhere else (``i ≥ v_t`` is never read: its ``γ`` gets no gradient).

The selection is piecewise constant: gradients flow through the kept weights (and, renormalised, through
both sums), never through the choice. ``naive.py`` implements the same rule token by token.
"""

from __future__ import annotations

import torch


def visible_mask(visible: torch.Tensor, slots: int) -> torch.Tensor:
    """``[B, T, 1, slots]``: True where cache ``i < visible[b, t]``."""
    return (torch.arange(slots, device=visible.device) < visible[..., None].long())[:, :, None, :]


def select_top_k(gamma: torch.Tensor, visible: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """``[B, T, H, N]`` bool: the caches each token reads, ``J_t`` of the module docstring (all visible ones
    when ``top_k`` is None). A caller that computes its own weights over the selection (e.g. a softmax over the
    online memory and the kept caches, sparse selective caching) selects with this on its scores."""
    vis = visible_mask(visible, gamma.shape[-1]).expand(gamma.shape)
    if top_k is None or top_k >= gamma.shape[-1]:
        return vis.clone()
    key = torch.where(vis, gamma, torch.full((), -torch.inf, dtype=gamma.dtype, device=gamma.device))
    order = torch.sort(key.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    keep = torch.zeros_like(vis).scatter(-1, order, True)
    return keep & vis


def effective_gamma(
    gamma: torch.Tensor, visible: torch.Tensor, top_k: int | None, renormalize: bool
) -> torch.Tensor:
    """``γ'`` of the module docstring, ``[B, T, H, N]``, zero outside each token's selection."""
    zero = gamma.new_zeros(())
    read = torch.where(visible_mask(visible, gamma.shape[-1]), gamma, zero)
    if top_k is None or top_k >= gamma.shape[-1]:
        return read
    kept = torch.where(select_top_k(gamma, visible, top_k), gamma, zero)
    if not renormalize:
        return kept
    total, part = read.sum(-1, keepdim=True), kept.sum(-1, keepdim=True)
    nonzero = part != 0
    return kept * torch.where(nonzero, total / torch.where(nonzero, part, torch.ones_like(part)), 1.0)
