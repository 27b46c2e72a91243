"""Scores of generated answers.

- S-NIAH (RULER, Hsieh et al. 2024, ``string_match_all``): the expected answer occurs in the
  output, case-insensitively.
- Passkey (Mohtashami & Jaggi 2023): the first integer in the output equals the key.
"""

from __future__ import annotations

import re

_INTEGER = re.compile(r"\d+")


def contains_answer(output: str, answer: str) -> bool:
    """True when ``answer`` occurs in ``output`` (case-insensitive; an empty answer never matches)."""
    return bool(answer) and answer.lower() in output.lower()


def first_integer(text: str) -> int | None:
    """The first run of decimal digits in ``text`` as an int, or None if there is none."""
    match = _INTEGER.search(text)
    return int(match.group()) if match else None


def passkey_correct(output: str, passkey: int) -> bool:
    """True when the first integer generated is exactly ``passkey``."""
    return first_integer(output) == passkey
