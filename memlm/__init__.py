"""memlm: memory-centric language-model backbones on shared chunked-scan kernels."""

from memlm import layers  # noqa: F401  (registers the built-in mixers)
from memlm.models import MemLMCache, MemLMConfig, MemLMForCausalLM, MemLMModel
from memlm.models.convert import from_pretrained, load_tokenizer
from memlm.presets import load_preset

__version__ = "0.1.0"
__all__ = ["MemLMCache", "MemLMConfig", "MemLMForCausalLM", "MemLMModel", "__version__", "from_pretrained",
           "load_preset", "load_tokenizer"]
