"""Token mixers and blocks. Importing this package registers every built-in mixer."""

from memlm.layers import (  # noqa: F401  (each module registers its mixers)
    attention,
    delta_net,
    gated_deltanet,
    gla,
    hgrn,
    hgrn2,
    mamba2,
    memory_caching,
    miras,
    mom,
    neural_memory,
    retnet,
    titans_mac,
    titans_mag,
    titans_mal,
)
from memlm.layers.block import Block
from memlm.layers.mixer import Mixer
from memlm.layers.registry import MIXERS, parse_spec, register_mixer

__all__ = ["MIXERS", "Block", "Mixer", "parse_spec", "register_mixer"]
