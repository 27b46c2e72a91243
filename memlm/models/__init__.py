"""HF config + model, registered with the Auto classes on import."""

from transformers import AutoConfig, AutoModelForCausalLM

from memlm.models.cache import MemLMCache
from memlm.models.configuration_memlm import MemLMConfig, ratio_pattern
from memlm.models.modeling_memlm import MemLMForCausalLM, MemLMModel

AutoConfig.register("memlm", MemLMConfig, exist_ok=True)
AutoModelForCausalLM.register(MemLMConfig, MemLMForCausalLM, exist_ok=True)

__all__ = ["MemLMCache", "MemLMConfig", "MemLMForCausalLM", "MemLMModel", "ratio_pattern"]
