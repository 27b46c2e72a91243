"""Loading checkpoints of other codebases into memlm modules (see ``registry`` for adding one).

``from_pretrained`` reads memlm checkpoints and every registered foreign format (fla's families
in ``fla.py``, Mixture-of-Memories in ``mom.py``); ``convert_checkpoint`` / ``memlm convert`` writes
them in memlm's format; ``load_tokenizer`` finds the matching tokenizer offline.
"""

from memlm.models.convert import (
    fla,  # noqa: F401  (registers flash-linear-attention's formats)
    mom,  # noqa: F401  (registers the MoM formats: fla's and linear-moe-hub's)
)
from memlm.models.convert.loader import convert_checkpoint, convert_config, from_pretrained, load_converted
from memlm.models.convert.registry import FORMATS, Format, get_format, register_format
from memlm.models.convert.tokenizer import load_tokenizer, mistral_v1_tokenizer

__all__ = [
    "FORMATS", "Format", "convert_checkpoint", "convert_config", "from_pretrained", "get_format",
    "load_converted", "load_tokenizer", "mistral_v1_tokenizer", "register_format",
]
