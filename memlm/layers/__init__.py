"""Token mixers and blocks. Importing this package registers every built-in mixer."""

from memlm.layers import attention  # noqa: F401  (registers "attention")
from memlm.layers.block import Block
from memlm.layers.mixer import Mixer
from memlm.layers.registry import MIXERS, parse_spec, register_mixer

__all__ = ["MIXERS", "Block", "Mixer", "parse_spec", "register_mixer"]
