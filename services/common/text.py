"""Text measures shared by the scorer's heuristics and the filter's rules."""

from __future__ import annotations


def normalize(text: str) -> str:
    """Case-folded, whitespace collapsed and stripped: what duplicates are compared on.
    (``str.split()`` splits at what ``\\s`` matches, ``str.isspace``, in a third of the
    time of the regular expression.)"""
    return " ".join(text.casefold().split())


REPETITION_MEASURE = "word_ngram_repetition"
"""The ``measure`` a score of :func:`repetition_ratio` names in its details, with its
``ngram``: the filter's repetition rule reuses such a score instead of measuring again."""


def repetition_ratio(text: str, n: int = 3) -> float:
    """1 - distinct/total over the word n-grams of ``text``; 0.0 when it has none. A
    completion stuck in a loop scores close to 1."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0
