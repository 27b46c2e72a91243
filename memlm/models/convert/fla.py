"""flash-linear-attention checkpoints (fla-hub models, the 72 m-a-p hybrid-linear-attention models).

fla's models share memlm's layout (``model.embeddings``, ``model.layers.{i}.attn_norm|attn|
mlp_norm|mlp``, ``model.norm``, ``lm_head``) and memlm's mixers use fla's parameter names, so
most tensors load as they are. What differs, per family:

- the config: fla keys → one mixer spec per layer; a hybrid ``attn`` entry (a dict, or a list of
  dicts, each with ``layers``, ``num_heads``, ``num_kv_heads``, ``qkv_bias``, ``window_size``,
  ``rope_theta``) turns the listed layers into attention;
- HGRN / HGRN2: fla's model-level ``model.lower_bounds`` ``[L, D]`` becomes, for layer l ≥ 1, the
  lower bound ``γ_l = cumsum(softmax(lower_bounds))_l − softmax(lower_bounds)_0`` (Qin et al. 2023,
  eq. 6), stored per layer as ``attn.lower_bound.logit = logit(γ_l)``; layer 0 has none;
- GLA / RetNet saved with ``fuse_norm=False``: ``attn.g_norm`` is the swish-gated output norm
  (memlm's ``attn.g_norm_swish_gate``, fla's fused name);
- Mamba2: ``backbone.*`` names and no MLP (a zero MLP of width 1 keeps memlm's block exact);
- legacy tensors: Gated DeltaNet releases before fla 0.2 carry an unused ``attn.D`` (fla #226,
  the m-a-p models among them), dropped with a warning;
- fla's MLP before 0.2 (fla ``bcd9e79``, Dec 2024: the linear-moe-hub ``Gated-Deltanet-*``
  baselines, ``model_type`` ``gated_deltanet``) stores one fused ``mlp.gate_proj`` ``[2·inter, d]``,
  split by :func:`split_fused_mlp`; those configs also carry ``norm_first`` (only False is read).
The m-a-p models are this format in float32 with an untied LM head; nothing else differs.
Defaults below are those of fla 0.6's config classes (``fla/models/*/configuration_*.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from memlm.models.convert.registry import Format, Tensors, keep_tensors, register_format

LEGACY_D = r"^model\.layers\.\d+\.attn\.D$"  # Gated DeltaNet / MoM before fla 0.2: stored, never read

FLA_COMMON: dict[str, Any] = {
    "vocab_size": 32000, "hidden_size": 2048, "num_hidden_layers": 24, "hidden_ratio": 4,
    "intermediate_size": None, "hidden_act": "swish", "max_position_embeddings": 2048, "norm_eps": 1e-6,
    "attn": None, "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False, "initializer_range": 0.02, "fuse_norm": True, "fuse_swiglu": True,
    "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False, "use_l2warp": False, "attn_mode": "chunk",
    "attnres_block_size": None, "elementwise_affine": True,
}


def require(config: Mapping[str, Any], key: str, allowed: tuple[Any, ...]) -> None:
    """Refuse a config value memlm does not implement (it would change the computation)."""
    if config.get(key) not in allowed:
        raise ValueError(f"config.json: {key}={config.get(key)!r} is not supported by memlm's "
                         f"{config.get('model_type')} loader (supported: {list(allowed)})")


def fla_intermediate_size(config: Mapping[str, Any]) -> int:
    """fla's ``GatedMLP`` width: ``intermediate_size``, else ``2/3 · hidden_ratio · d`` rounded up to 256."""
    if config.get("intermediate_size"):
        return int(config["intermediate_size"])
    width = int(config["hidden_size"] * (config.get("hidden_ratio") or 4) * 2 / 3)
    return 256 * ((width + 255) // 256)


def fla_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """MemLMConfig values shared by fla's families (blocks with a SwiGLU MLP)."""
    require(config, "hidden_act", ("swish",))
    require(config, "attnres_block_size", (None,))
    require(config, "elementwise_affine", (True, None))
    return {
        "vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
        "num_hidden_layers": config["num_hidden_layers"], "num_heads": config.get("num_heads") or 1,
        "num_kv_heads": config.get("num_kv_heads"), "intermediate_size": fla_intermediate_size(config),
        "max_position_embeddings": config["max_position_embeddings"], "norm_eps": config["norm_eps"],
        "rope_theta": config.get("rope_theta") or 10000.0, "initializer_range": config["initializer_range"],
        "tie_word_embeddings": bool(config["tie_word_embeddings"]), "use_cache": config["use_cache"],
        "bos_token_id": config.get("bos_token_id"), "eos_token_id": config.get("eos_token_id"),
        "pad_token_id": config.get("pad_token_id"),
    }


def attention_layers(config: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """The attention spec of each layer a hybrid ``attn`` entry lists (dict or list-of-dicts form)."""
    attn, num_layers = config.get("attn"), config["num_hidden_layers"]
    if attn is None:
        return {}
    entries = [attn] if isinstance(attn, Mapping) else attn
    if not isinstance(entries, list) or not all(isinstance(e, Mapping) for e in entries):
        raise ValueError(f"config.json: attn must be a dict or a list of dicts, got {attn!r}")
    layers: dict[int, dict[str, Any]] = {}
    for entry in entries:
        if "layers" not in entry or "num_heads" not in entry:
            raise ValueError(f"config.json: every attn entry needs 'layers' and 'num_heads', "
                             f"got {dict(entry)}")
        spec = {"name": "attention", "num_heads": entry["num_heads"],
                "num_kv_heads": entry.get("num_kv_heads") or entry["num_heads"],
                "qkv_bias": bool(entry.get("qkv_bias", False)), "window_size": entry.get("window_size"),
                "rope_theta": float(entry.get("rope_theta") or 10000.0)}
        for i in entry["layers"]:
            if not isinstance(i, int) or not 0 <= i < num_layers or i in layers:
                raise ValueError(f"config.json: attn layer index {i!r} is out of [0, {num_layers}) "
                                 "or repeated")
            layers[i] = spec
    return layers


def split_fused_mlp(config: Mapping[str, Any], tensors: Tensors, specs: list[dict[str, Any]]) -> Tensors:
    """A fused ``mlp.gate_proj`` ``[2·inter, d]`` (fla before 0.2, the MoM repo; docs/design.md §4.3) →
    memlm's ``gate_proj`` / ``up_proj``: the gate half comes first (``gate, up = gate_proj(x).chunk(2, -1)``).

    A layer whose ``up_proj`` is present, or whose ``gate_proj`` is not ``2·inter`` rows, is left as it is
    (the loader then reports what does not fit).
    """
    rows = 2 * fla_intermediate_size(config)
    for i in range(len(specs)):
        gate, up = f"model.layers.{i}.mlp.gate_proj.weight", f"model.layers.{i}.mlp.up_proj.weight"
        if gate in tensors and up not in tensors and tensors[gate].shape[0] == rows:
            tensors[gate], tensors[up] = tensors[gate].chunk(2, dim=0)
    return tensors


def _spec(name: str, config: Mapping[str, Any], keys: tuple[str, ...], **extra: Any) -> dict[str, Any]:
    """A mixer spec copying ``keys`` from the config (same names in fla and memlm) plus ``extra``."""
    return {"name": name, **{k: config[k] for k in keys}, "norm_eps": config["norm_eps"], **extra}


def _rename(tensors: Tensors, pattern: str, replacement: str) -> Tensors:
    return {re.sub(pattern, replacement, k): v for k, v in tensors.items()}


def _linear_layers(specs: list[dict[str, Any]], names: tuple[str, ...]) -> list[int]:
    return [i for i, s in enumerate(specs) if s["name"] in names]


# ---- Gated DeltaNet, DeltaNet -------------------------------------------------------------------

def _gated_deltanet(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    require(config, "output_gate_activation", ("swish", "silu", "sigmoid"))
    require(config, "norm_first", (False, None))  # pre-0.2 configs: True moves the norms into attn/mlp
    return _spec("gated_deltanet", config, ("num_heads", "head_dim", "expand_v", "num_v_heads", "use_gate",
                                            "use_short_conv", "conv_size", "allow_neg_eigval",
                                            "output_gate_activation"))


def _delta_net(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    return _spec("delta_net", config, ("num_heads", "expand_k", "expand_v", "use_beta", "use_gate",
                                       "use_short_conv", "conv_size", "allow_neg_eigval", "qk_activation",
                                       "qk_norm"))


# ---- GLA, RetNet ---------------------------------------------------------------------------------

def _gla(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    return _spec("gla", config, ("num_heads", "num_kv_heads", "expand_k", "expand_v", "feature_map",
                                 "use_short_conv", "conv_size", "use_output_gate", "clamp_min"),
                 gate_fn=config["hidden_act"])


def _retnet(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    # fla's RetNet block passes no short-conv options: its retention never convolves.
    return _spec("retnet", config, ("num_heads", "num_kv_heads", "expand_k", "expand_v", "feature_map",
                                    "use_output_gate"), gate_fn=config["hidden_act"])


def _unfused_gate_norm(config: Mapping[str, Any], tensors: Tensors, specs: list[dict[str, Any]]) -> Tensors:
    """``fuse_norm=False`` saves the swish-gated output norm as ``attn.g_norm``: use the fused name."""
    if config["fuse_norm"] or not config["use_output_gate"]:
        return tensors
    for i in _linear_layers(specs, ("gla", "retnet")):
        old = f"model.layers.{i}.attn.g_norm.weight"
        if old in tensors:
            tensors[f"model.layers.{i}.attn.g_norm_swish_gate.weight"] = tensors.pop(old)
    return tensors


# ---- HGRN, HGRN2 ---------------------------------------------------------------------------------

def _lower_bound(config: Mapping[str, Any], i: int) -> float | None:
    """fla's γ_l at initialisation (``lower_bounds = 0``: ``l / L``); layer 0 has no lower bound."""
    return i / config["num_hidden_layers"] if config["use_lower_bound"] and i > 0 else None


def _hgrn(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    return _spec("hgrn", config, ("expand_ratio", "use_short_conv", "conv_size"),
                 lower_bound=_lower_bound(config, i))


def _hgrn2(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    hidden, ratio, heads = config["hidden_size"], config["expand_ratio"], config["num_heads"]
    if ratio is None and heads is None:
        raise ValueError("config.json: hgrn2 needs expand_ratio or num_heads")
    heads = hidden // ratio if ratio is not None else heads
    ratio = ratio if ratio is not None else hidden // heads
    # fla's HGRN2 output norm is fused into o_proj (``rms_norm_linear``) with that op's eps 1e-5,
    # whatever ``norm_eps`` says.
    return {**_spec("hgrn2", config, ("use_short_conv", "conv_size"), num_heads=heads, expand_ratio=ratio,
                    lower_bound=_lower_bound(config, i)), "norm_eps": 1e-5}


def _lower_bounds(config: Mapping[str, Any], tensors: Tensors, specs: list[dict[str, Any]]) -> Tensors:
    """``model.lower_bounds`` ``[L, D]`` → ``model.layers.{l}.attn.lower_bound.logit`` = logit(γ_l)."""
    raw = tensors.pop("model.lower_bounds", None)
    if raw is None or not config["use_lower_bound"]:
        return tensors
    p = raw.double().softmax(0)
    gamma = p.cumsum(0) - p[0]
    for i, spec in enumerate(specs):
        if spec.get("lower_bound") is not None:
            logit = gamma[i].log() - torch.log1p(-gamma[i])
            tensors[f"model.layers.{i}.attn.lower_bound.logit"] = logit.float()
    return tensors


# ---- Transformer ---------------------------------------------------------------------------------

def _transformer(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    return {"name": "attention", "num_heads": config["num_heads"],
            "num_kv_heads": config["num_kv_heads"] or config["num_heads"], "qkv_bias": config["qkv_bias"],
            "qk_norm": config["qk_norm"], "window_size": config["window_size"],
            "rope_theta": float(config["rope_theta"] or 10000.0)}


# ---- Mamba2 --------------------------------------------------------------------------------------

def _mamba2(config: Mapping[str, Any], i: int) -> dict[str, Any]:
    low, high = config["dt_limit"]
    return _spec("mamba2", config, ("head_dim", "state_size", "expand", "n_groups", "conv_kernel",
                                    "use_conv_bias", "hidden_act", "D_has_hdim", "rmsnorm",
                                    "norm_before_gate", "use_bias"),
                 dt_limit=None if (low <= 0 and math.isinf(high)) else [float(low), float(high)])


def _mamba2_model_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """fla's Mamba2 blocks have no MLP: memlm's block gets a width-1 MLP that is zeroed on load."""
    return {**fla_model_config({**config, "hidden_act": "swish", "num_heads": None}), "intermediate_size": 1}


def _mamba2_tensors(config: Mapping[str, Any], tensors: Tensors, specs: list[dict[str, Any]]) -> Tensors:
    """``backbone.*`` → ``model.*`` (``norm`` → ``attn_norm``, ``mixer`` → ``attn``, ``norm_f`` → ``norm``),
    plus the zero MLP of every block (``down_proj = 0``: the block adds exactly nothing)."""
    tensors = _rename(tensors, r"^backbone\.layers\.(\d+)\.norm\.", r"model.layers.\1.attn_norm.")
    tensors = _rename(tensors, r"^backbone\.layers\.(\d+)\.mixer\.", r"model.layers.\1.attn.")
    tensors = _rename(tensors, r"^backbone\.norm_f\.", "model.norm.")
    tensors = _rename(tensors, r"^backbone\.", "model.")
    hidden = config["hidden_size"]
    for i in range(len(specs)):
        tensors[f"model.layers.{i}.mlp_norm.weight"] = torch.ones(hidden)
        for name, shape in (("gate_proj", (1, hidden)), ("up_proj", (1, hidden)), ("down_proj", (hidden, 1))):
            tensors[f"model.layers.{i}.mlp.{name}.weight"] = torch.zeros(shape)
    return tensors


def _register(model_type: str, defaults: dict[str, Any], layer_spec: Any, tensors: Any = keep_tensors,
              legacy: tuple[str, ...] = (), model_config: Any = fla_model_config) -> None:
    register_format(Format(model_type=model_type, defaults=defaults, layer_spec=layer_spec,
                           model_config=model_config, tensors=tensors, legacy=legacy))


_register("gated_deltanet", {**FLA_COMMON, "num_hidden_layers": 21, "head_dim": 256, "num_heads": 6,
                             "num_v_heads": None, "expand_v": 2.0, "use_gate": True, "use_short_conv": True,
                             "allow_neg_eigval": False, "conv_size": 4, "output_gate_activation": "swish",
                             "norm_first": False},
          _gated_deltanet, tensors=split_fused_mlp, legacy=(LEGACY_D,))
_register("delta_net", {**FLA_COMMON, "num_heads": 16, "expand_k": 1.0, "expand_v": 1.0, "use_gate": False,
                        "use_short_conv": True, "allow_neg_eigval": False, "conv_size": 4, "use_beta": True,
                        "use_output_norm": True, "qk_norm": "l2", "qk_activation": "silu"}, _delta_net)
_register("gla", {**FLA_COMMON, "num_heads": 4, "num_kv_heads": None, "expand_k": 0.5, "expand_v": 1.0,
                  "feature_map": None, "use_short_conv": False, "conv_size": 4, "use_output_gate": True,
                  "clamp_min": None, "use_gk": True, "use_gv": False}, _gla, tensors=_unfused_gate_norm)
_register("retnet", {**FLA_COMMON, "hidden_ratio": 2, "num_heads": 8, "num_kv_heads": None, "expand_k": 1.0,
                     "expand_v": 2.0, "feature_map": None, "use_short_conv": False, "conv_size": 4,
                     "use_output_gate": True}, _retnet, tensors=_unfused_gate_norm)
_register("hgrn", {**FLA_COMMON, "attn_mode": "fused_recurrent", "expand_ratio": 1, "use_short_conv": False,
                   "conv_size": 4, "use_lower_bound": True}, _hgrn, tensors=_lower_bounds)
_register("hgrn2", {**FLA_COMMON, "num_heads": None, "expand_ratio": 128, "use_short_conv": False,
                    "conv_size": 4, "use_lower_bound": True}, _hgrn2, tensors=_lower_bounds)
_register("transformer", {**FLA_COMMON, "num_heads": 32, "num_kv_heads": None, "qkv_bias": False,
                          "qk_norm": False, "window_size": None, "rope_theta": 10000.0}, _transformer)
_register("mamba2", {
    "head_dim": 64, "vocab_size": 32000, "hidden_size": 2048, "state_size": 128, "num_hidden_layers": 48,
    "norm_eps": 1e-5, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "expand": 2, "conv_kernel": 4,
    "n_groups": 1, "use_bias": False, "use_conv_bias": True, "conv_init": None, "A_init_range": [1, 16],
    "D_has_hdim": False, "hidden_act": "silu", "initializer_range": 0.02, "residual_in_fp32": True,
    "dt_min": 0.001, "dt_max": 0.1, "dt_init_floor": 1e-4, "dt_limit": [0.0, math.inf],
    "rescale_prenorm_residual": True, "use_cache": True, "rmsnorm": True, "norm_before_gate": False,
    "chunk_size": 256, "fuse_norm": True, "fuse_cross_entropy": True, "fuse_linear_cross_entropy": False,
    "use_l2warp": False, "tie_word_embeddings": False, "num_heads": None, "max_position_embeddings": 2048,
}, _mamba2, tensors=_mamba2_tensors, model_config=_mamba2_model_config)
