"""``MemLMForCausalLM``: embeddings → N pre-norm blocks (any registered mixer) → RMSNorm → LM head.

Parameter names follow flash-linear-attention (``model.embeddings``, ``model.layers.{i}.attn``,
``attn_norm``, ``mlp_norm``, ``mlp``, ``model.norm``, ``lm_head``) so its checkpoints map 1:1.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import PreTrainedModel

from memlm.layers import aux_loss
from memlm.layers.block import Block
from memlm.layers.mixer import RowStates
from memlm.models import padding
from memlm.models.cache import MemLMCache
from memlm.models.configuration_memlm import MemLMConfig


@dataclass
class MemLMModelOutput(BaseModelOutputWithPast):
    """``aux_loss``: the mixers' auxiliary losses, scaled and summed (None when no mixer has one);
    ``aux_losses``: each kind unscaled, by name (``memlm.layers.aux_loss``)."""

    aux_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None


@dataclass
class MemLMCausalLMOutput(CausalLMOutputWithPast):
    """``loss`` is the language-model cross-entropy alone; the training objective is ``loss + aux_loss``
    (the trainer adds it; a custom loop must too: MoM's load balance is in ``aux_loss``)."""

    aux_loss: torch.Tensor | None = None
    aux_losses: dict[str, torch.Tensor] | None = None


class MemLMPreTrainedModel(PreTrainedModel):
    config_class = MemLMConfig
    config: MemLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]
    _skip_keys_device_placement = ["cache"]

    @classmethod
    def is_custom_code(cls) -> bool:
        # Our _init_weights goes through transformers.initialization (which skips loaded tensors),
        # so HF must not take its "remote code" shortcut that skips modules without direct parameters
        # (it would leave e.g. a mixer's ParameterList and gate biases uninitialised).
        return False

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """HF loading made strict: a missing, unexpected or mis-shaped tensor stops the load with
        all of them listed (HF would initialise a missing tensor afresh and only warn). Then every
        tensor is copied into freshly allocated (aligned) storage: tensors left at the
        memory-mapped file's offsets make CPU kernels take other SIMD paths, so the loaded model
        would compute slightly different floats from the saved one."""
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["ignore_mismatched_sizes"] = True  # reported below, with the other problems
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        mismatched = [f"{name} {list(saved)} (model: {list(model_shape)})"
                      for name, saved, model_shape in info.get("mismatched_keys", ())]
        found = {"missing tensors": sorted(info.get("missing_keys", ())),
                 "unexpected tensors": sorted(info.get("unexpected_keys", ())), "shape mismatches": sorted(mismatched)}
        problems = [f"{what} ({len(names)}): {', '.join(names)}" for what, names in found.items() if names]
        if problems:
            source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            raise ValueError(f"checkpoint {source} does not fit {cls.__name__}: " + "; ".join(problems))
        with torch.no_grad():
            for t in [*model.parameters(), *model.buffers()]:
                t.data = t.data.clone()
        model.tie_weights()
        return (model, info) if want_info else model

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if hasattr(module, "init_weights") and module is not self:
            module.init_weights(init, self.config.initializer_range)


class MemLMModel(MemLMPreTrainedModel):
    def __init__(self, config: MemLMConfig) -> None:
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, spec) for i, spec in enumerate(config.layer_specs()))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: MemLMCache | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> MemLMModelOutput:
        """``attention_mask`` (1 = token, 0 = padding) runs a padded batch as if each row were alone
        (``memlm/models/padding.py``); padded positions get zero hidden states."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        shape = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        tokens = padding.tokens_of(attention_mask, shape, cache.seen_tokens if cache is not None else 0)
        if tokens is not None and cu_seqlens is not None:
            raise ValueError("pass either attention_mask with padding or cu_seqlens (packed documents), not both")
        if input_ids is not None:
            _check_token_ids(input_ids, self.config.vocab_size)
            inputs_embeds = self.embeddings(input_ids)
        use_cache = use_cache if use_cache is not None else (cache is not None)
        if use_cache and cache is None:
            cache = MemLMCache(len(self.layers))
        with aux_loss.collect() as terms:
            if tokens is None:
                h = self._layers(inputs_embeds, cache, use_cache, cu_seqlens)
            elif use_cache:
                padding.check_generation_padding(tokens)
                h = self._prefill_rows(inputs_embeds, tokens, cache)
            elif all(layer.attn.packs_documents for layer in self.layers):
                h = padding.run_packed(partial(self._layers, cache=None, use_cache=False), inputs_embeds, tokens)
            else:
                h = self._prefill_rows(inputs_embeds, tokens, None)
        if use_cache:
            cache.seen_tokens += h.shape[1]
        total, values = aux_loss.combine(terms)
        return MemLMModelOutput(last_hidden_state=self.norm(h), cache=cache, aux_loss=total,
                                aux_losses=values or None)

    def _layers(self, h: torch.Tensor, cache: MemLMCache | None, use_cache: bool,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks, top to bottom, each continuing from (and updating) its state in ``cache``."""
        for i, layer in enumerate(self.layers):
            state = cache.states[i] if cache is not None else None
            if isinstance(state, RowStates):
                h, new_state = padding.run_rows(layer, h, state, use_cache)
            else:
                h, new_state = layer(h, state=state, use_cache=use_cache, cu_seqlens=cu_seqlens)
            if use_cache:
                cache.states[i] = new_state
        return h

    def _prefill_rows(self, x: torch.Tensor, tokens: torch.Tensor, cache: MemLMCache | None) -> torch.Tensor:
        """Each row's tokens alone (zeros at the pads); with ``cache`` (empty: a left-padded prompt) the
        rows' states stacked into it."""
        h = x.new_zeros(x.shape)
        rows = [MemLMCache(len(self.layers)) if cache is not None else None for _ in range(x.shape[0])]
        for i, row in enumerate(rows):
            h[i, tokens[i]] = self._layers(x[i:i + 1, tokens[i]], row, cache is not None)[0]
        if cache is not None:
            cache.states = [padding.stack_layer(layer.attn, [row.states[j] for row in rows])
                            for j, layer in enumerate(self.layers)]
        return h


def _check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids outside ``[0, vocab_size)`` mean a tokenizer/model mismatch: say so plainly."""
    if input_ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"input_ids contain token ids in [{lo}, {hi}] but the model's vocab_size is {vocab_size}: "
                "the tokenizer does not match the model"
            )


class MemLMForCausalLM(MemLMPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embeddings.weight"}

    def __init__(self, config: MemLMConfig) -> None:
        super().__init__(config)
        self.model = MemLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        # Mixers keep their own states (KV caches, recurrent memories) in a MemLMCache.
        return False

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        """``GenerationMixin.generate`` after one check: a prompt needs at least one token (a
        tokenizer without BOS gives none for ``""``)."""
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None and kwargs.get("inputs_embeds") is None:
            raise ValueError("generate() needs a prompt: pass input_ids (at least one token) or inputs_embeds")
        if prompt is not None and prompt.shape[-1] == 0:
            raise ValueError("the prompt is empty (0 tokens): generation needs at least one token to condition on; "
                             "this tokenizer adds no BOS token, so start the prompt with text or with its eos/bos id")
        return super().generate(inputs, *args, **kwargs)

    def recurrent_state_size(self, seq_len: int) -> int:
        """State elements one sequence carries after ``seq_len`` tokens, summed over layers."""
        return sum(layer.attn.state_size(seq_len) for layer in self.model.layers)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: MemLMCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        cu_seqlens: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        return_dict: bool | None = None,
        past_key_values: MemLMCache | None = None,
        **kwargs: Any,
    ) -> MemLMCausalLMOutput:
        """``cache`` is the decoding state (transformers >= 5.24 passes it under that name);
        ``past_key_values``, its earlier name, is accepted too."""
        if past_key_values is not None:
            if cache is not None and cache is not past_key_values:
                raise ValueError("pass the decoding cache once: as cache (or as its earlier name past_key_values)")
            cache = past_key_values
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, cache=cache,
                         use_cache=use_cache, cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        h = out.last_hidden_state
        if logits_to_keep:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            targets = labels[:, 1:]
            if attention_mask is not None and attention_mask.shape[1] == labels.shape[1]:
                pair = attention_mask[:, 1:].bool() & attention_mask[:, :-1].bool()  # no prediction to or from a pad
                targets = targets.masked_fill(~pair, -100)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100)
        return MemLMCausalLMOutput(loss=loss, logits=logits, cache=out.cache, aux_loss=out.aux_loss,
                                   aux_losses=out.aux_losses)
