"""Mixture-of-Memories checkpoints (docs/design.md §4.3): fla 0.6's ``mom`` and the MoM authors'
linear-moe-hub ``mom_gated_deltanet``.

memlm's ``mom`` mixer uses fla's ``MomAttention`` parameter names (``q_proj``, ``gate``, ``k_proj.{e}``,
``v_proj.{e}``, ``b_proj.{e}``, ``a_proj.{e}``, ``shared_k|v|b|a``, ``A_log``, ``dt_bias``, the short
convolutions, ``g_proj``, ``o_norm``, ``o_proj``), so both layouts load as they are except:

- ``mom_gated_deltanet`` (the MoM repo's ``mom_naive`` classes, linear-moe-hub's ``MoM-*``): the
  output gate is ``use_gate`` (fla: ``use_output_gate``); the MLP is one fused ``mlp.gate_proj``
  ``[2·inter, d]``, gate half first (``fla.split_fused_mlp``); every layer carries an unused
  ``attn.D`` (dropped with one warning); ``norm_first`` must be False; its defaults differ from fla's
  (8 memories, no shared memory, ``expand_v`` 2, 6 heads, 21 layers);
- ``capacity``: fla 0.6 accepts it and never reads it (every routed token is kept), so any value loads
  as memlm's no-drop 1.0. The MoM repo's naive layer instead keeps only the newest
  ``ceil(T · capacity / topk)`` tokens of a memory's bucket (and runs them in bfloat16 when T > 64);
  memlm's outputs match it only while no memory receives more than that many of a sequence's T tokens;
- a hybrid ``attn`` entry maps its layers to attention as in the other fla families. Neither fla 0.6's
  ``MomBlock`` nor the MoM repo's block can run one (both unpack a router-logits output that their
  ``Attention`` does not return), so such a checkpoint cannot come from their code: it is read in
  fla's attention layout.

Where memlm's MoM computes otherwise than fla (a stable routing sort; per-bucket short convolutions in
training as in eval) is in ``memlm/layers/mom.py``; a loaded model's eval-mode logits are fla's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from memlm.models.convert.fla import FLA_COMMON, LEGACY_D, fla_model_config, require, split_fused_mlp
from memlm.models.convert.registry import Format, register_format

# Options read under the same name by fla / the MoM repo and by memlm's ``mom`` mixer.
SHARED_KEYS = ("num_heads", "head_dim", "expand_v", "num_memories", "topk", "shared_mem", "single_kv_proj",
               "aux_loss_scale", "use_short_conv", "conv_size")

# fla 0.6's MomConfig (fla/models/mom/configuration_mom.py).
MOM_DEFAULTS: dict[str, Any] = {
    **FLA_COMMON, "head_dim": 256, "num_heads": 4, "expand_v": 1.0, "num_memories": 4, "topk": 2,
    "capacity": 1.0, "use_layer_wise_balance": True, "aux_loss_scale": 0.01, "shared_mem": True,
    "single_kv_proj": False, "use_output_gate": True, "use_short_conv": True, "conv_size": 4,
    "mom_backend": "gated_deltanet",
}

# The MoM repo's MomGatedDeltaNetConfig (mom_naive/models/mom_gated_deltanet/).
LINEAR_MOE_HUB_DEFAULTS: dict[str, Any] = {
    **FLA_COMMON, "num_hidden_layers": 21, "head_dim": 256, "num_heads": 6, "expand_v": 2, "num_memories": 8,
    "topk": 2, "capacity": 1.0, "use_layer_wise_balance": True, "aux_loss_scale": 0.01, "shared_mem": False,
    "single_kv_proj": False, "use_gate": True, "use_short_conv": True, "conv_size": 4, "norm_first": False,
}


def mom_spec(config: Mapping[str, Any], use_output_gate: bool) -> dict[str, Any]:
    """The ``mom`` mixer spec of a MoM layer with Gated DeltaNet memories (docs/design.md §4.3).

    ``capacity`` is not copied: fla ignores it (no token is dropped), which is memlm's capacity 1.0.
    """
    return {"name": "mom", "base": "gated_deltanet", **{k: config[k] for k in SHARED_KEYS},
            "expand_v": float(config["expand_v"]), "capacity": 1.0, "use_output_gate": bool(use_output_gate),
            "norm_eps": config["norm_eps"]}


def _fla_mom(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    require(config, "mom_backend", ("gated_deltanet",))
    return mom_spec(config, config["use_output_gate"])


def _linear_moe_hub_mom(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    require(config, "norm_first", (False, None))  # True moves the norms into attn / mlp
    return mom_spec(config, config["use_gate"])


register_format(Format("mom", MOM_DEFAULTS, _fla_mom, fla_model_config))
register_format(Format("mom_gated_deltanet", LINEAR_MOE_HUB_DEFAULTS, _linear_moe_hub_mom, fla_model_config,
                       tensors=split_fused_mlp, legacy=(LEGACY_D,)))
