"""Needle-in-a-haystack prompts: RULER's S-NIAH-1/2/3 and the passkey test.

S-NIAH (Hsieh et al. 2024, "RULER", Table 2; single needle, single query, so RULER's
template is in its singular form):
  needle   ``One of the special magic {numbers|uuids} for {key} is: {value}.``
  prompt   ``A special magic {number|uuid} is hidden within the following text. Make sure to
           memorize it. I will quiz you about the {number|uuid} afterwards.\\n{context}\\nWhat is
           the special magic {number|uuid} for {key} mentioned in the provided text?``
           followed by the answer prefix ``The special magic {number|uuid} for {key} mentioned in
           the provided text is``.
  S-NIAH-1: noise haystack (the filler repeated, one per line), 7-digit number values;
  S-NIAH-2: prose haystack, 7-digit numbers; S-NIAH-3: prose haystack, UUID values. Keys are
  adjective-noun words.
Passkey (Mohtashami & Jaggi 2023, "Landmark Attention", App. E): task line, filler, the line
``The pass key is N. Remember it. N is the pass key.``, filler, then ``What is the pass key?
The pass key is``; ``N`` uniform in [1, 50000].

A sample is sized in tokens of the model's tokenizer: the haystack holds as many units
(filler blocks or sentences) as fit in ``context_length - max_new_tokens`` tokens with the
needle inserted after ``round(depth/100 · units)`` of them.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from memlm.eval.needle.haystack import NOISE

TASKS = ("s-niah-1", "s-niah-2", "s-niah-3", "passkey")
# tokens generated per task: enough for the answer (a UUID is up to ~30 tokens) and some slack
DEFAULT_MAX_NEW_TOKENS = {"s-niah-1": 32, "s-niah-2": 32, "s-niah-3": 64, "passkey": 16}

_ADJECTIVES = (
    "ancient", "bitter", "brave", "calm", "clever", "crimson", "curious", "distant", "eager", "fancy",
    "fragile", "gentle", "golden", "hollow", "humble", "icy", "jolly", "lively", "loud", "misty",
    "narrow", "noble", "odd", "pale", "quiet", "rapid", "rusty", "silent", "smooth", "tidy",
    "vivid", "wild",
)
_NOUNS = (
    "anchor", "badger", "basket", "canyon", "castle", "comet", "desert", "engine", "falcon", "forest",
    "garden", "glacier", "harbor", "island", "jacket", "kettle", "lantern", "meadow", "mirror", "needle",
    "orchard", "pebble", "pillow", "rabbit", "river", "saddle", "tunnel", "valley", "violin", "wagon",
    "window", "zebra",
)

_NIAH_VALUE_TYPE = {"s-niah-1": "number", "s-niah-2": "number", "s-niah-3": "uuid"}
_PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                 "them. I will quiz you about the important information there.")


@dataclass(frozen=True)
class NeedleSample:
    """One prompt: ``answer`` is what a correct output contains (passkey: the key as digits)."""

    task: str
    context_length: int
    depth: float
    prompt: str
    answer: str
    num_prompt_tokens: int
    haystack_units: int


def check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return task


def _niah_value(kind: str, rng: random.Random) -> str:
    if kind == "number":
        return str(rng.randint(1_000_000, 9_999_999))
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _assemble(task: str, key: str, answer: str, units: Sequence[str], at: int) -> str:
    """The full prompt with ``units`` as haystack and the needle after the first ``at`` units."""
    if task == "passkey":
        info = f"The pass key is {answer}. Remember it. {answer} is the pass key."
        filler = (" ".join(units[:at]), " ".join(units[at:]))
        return "\n".join([_PASSKEY_TASK, filler[0], info, filler[1], "What is the pass key? The pass key is"])
    kind = _NIAH_VALUE_TYPE[task]
    needle = f"One of the special magic {kind}s for {key} is: {answer}."
    sep = "\n" if task == "s-niah-1" else " "
    context = sep.join([*units[:at], needle, *units[at:]])
    return (
        f"A special magic {kind} is hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind} afterwards.\n{context}\n"
        f"What is the special magic {kind} for {key} mentioned in the provided text? "
        f"The special magic {kind} for {key} mentioned in the provided text is"
    )


def build_sample(
    task: str,
    count_tokens: Callable[[str], int],
    context_length: int,
    depth: float,
    rng: random.Random,
    prose: Sequence[str] | None = None,
    max_new_tokens: int | None = None,
) -> NeedleSample:
    """One sample of ``task`` at ``context_length`` tokens (prompt + ``max_new_tokens``) with the
    needle at ``depth`` percent of the haystack; ``count_tokens`` measures a prompt in tokens and
    ``prose`` gives the sentences of the S-NIAH-2/3 haystack (cycled when too short)."""
    check_task(task)
    if not 0.0 <= depth <= 100.0:
        raise ValueError(f"depth must be a percentage in [0, 100], got {depth!r}")
    budget = context_length - (max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[task])
    prose_task = task in ("s-niah-2", "s-niah-3")
    if prose_task and not prose:
        raise ValueError(f"task {task!r} needs prose haystack sentences, got none")
    key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    answer = str(rng.randint(1, 50_000)) if task == "passkey" else _niah_value(_NIAH_VALUE_TYPE[task], rng)

    def unit(i: int) -> str:
        return prose[i % len(prose)] if prose_task else NOISE

    def prompt(n: int) -> str:
        units = [unit(i) for i in range(n)]
        return _assemble(task, key, answer, units, round(depth / 100.0 * n))

    if count_tokens(prompt(0)) > budget:
        raise ValueError(
            f"context_length={context_length} leaves {budget} prompt tokens after generation, fewer than "
            f"the {count_tokens(prompt(0))} tokens of the {task} prompt without haystack"
        )
    lo, hi = 0, 1
    while hi <= budget and count_tokens(prompt(hi)) <= budget:  # every unit costs >= 1 token
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # largest n with count_tokens(prompt(n)) <= budget
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count_tokens(prompt(mid)) <= budget else (lo, mid)
    text = prompt(lo)
    return NeedleSample(task, context_length, float(depth), text, answer, count_tokens(text), lo)


def min_context_length(task: str, count_tokens: Callable[[str], int],
                       max_new_tokens: int | None = None) -> int:
    """Tokens a ``task`` sample needs without any haystack (a representative key and value)."""
    examples = {"passkey": "25000", "s-niah-3": str(uuid.UUID(int=0, version=4))}
    answer = examples.get(check_task(task), "5000000")
    new_tokens = max_new_tokens if max_new_tokens is not None else DEFAULT_MAX_NEW_TOKENS[task]
    return count_tokens(_assemble(task, f"{_ADJECTIVES[0]}-{_NOUNS[0]}", answer, [], 0)) + new_tokens


def token_counter(tokenizer: Any) -> Callable[[str], int]:
    """``len(tokenizer(text).input_ids)`` with the tokenizer's own special tokens (e.g. BOS)."""
    return lambda text: len(tokenizer(text)["input_ids"])
