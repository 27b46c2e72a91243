"""Miras hooks of the deep-memory op: the attentional bias and the retention transform.

Miras (Behrouz et al. 2025, arXiv 2504.13173) describes a memory by its inner loss
(attentional bias) and its retention gate. The op only needs two elementwise pieces:

* ``BIASES[name](e)`` — ψ(e) = ∂ℓ/∂M(k), the derivative of the attentional bias with
  respect to the memory output, evaluated at the error ``e = M(k) − v`` (shape ``[..., D]``).
  The weight gradient is then ``u = (∂M/∂W)ᵀ ψ(e)``, back-propagated through the MLP.
* ``RETENTIONS[name](w)`` — a transform applied to each layer's weights ``[N, H, d_in, d_out]``
  at every chunk end (after the update of the chunk's last token).

The naive reference, the PyTorch chunked path and the Triton path all look hooks up here,
so a Miras variant (ℓp, Huber, ℓq normalisation, softmax) is one new entry in each table.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Bias = Callable[[torch.Tensor], torch.Tensor]
Retention = Callable[[torch.Tensor], torch.Tensor]


def l2_bias(e: torch.Tensor) -> torch.Tensor:
    """ψ(e) = 2e, the derivative of ℓ = ‖M(k) − v‖² (summed over features) w.r.t. M(k)."""
    return 2 * e


def no_retention(w: torch.Tensor) -> torch.Tensor:
    """Identity retention: the state carries over chunk ends unchanged (Titans)."""
    return w


BIASES: dict[str, Bias] = {"l2": l2_bias}
RETENTIONS: dict[str, Retention] = {"none": no_retention}
