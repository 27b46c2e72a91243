"""Answer scoring on hand-written model outputs."""

from __future__ import annotations

import pytest

from memlm.eval.scoring import contains_answer, first_integer, passkey_correct


@pytest.mark.parametrize("output, answer, expected", [
    (" 4821937.", "4821937", True),
    ("The special magic number is 4821937 and more", "4821937", True),
    (" 482193", "4821937", False),  # truncated
    (" 4821 937", "4821937", False),  # split
    ("UUID: 1F0B7C2E-8A3D-4E5F-9A6B-7C8D9E0F1A2B", "1f0b7c2e-8a3d-4e5f-9a6b-7c8d9e0f1a2b", True),  # case
    ("", "4821937", False),
    ("anything", "", False),  # an empty answer never matches
])
def test_contains_answer(output, answer, expected):
    assert contains_answer(output, answer) is expected


@pytest.mark.parametrize("output, expected", [
    (" 31415. Remember it.", 31415),
    ("is 0042", 42),
    ("no digits here", None),
    ("12, then 345", 12),
])
def test_first_integer(output, expected):
    assert first_integer(output) == expected


@pytest.mark.parametrize("output, key, expected", [
    (" 31415. Remember it. 31415 is the pass key.", 31415, True),
    (" 3141. Remember it. 31415", 31415, False),  # the first integer decides
    (" The pass key is 31415", 31415, True),
    (" 314150", 31415, False),
    ("I do not know.", 31415, False),
])
def test_passkey_correct(output, key, expected):
    assert passkey_correct(output, key) is expected
