"""The word-count example's text generator, tokenizer and partitioner.

Shared by the node (which generates and counts its chunk), and by anyone who
wants to check a result: the same ``(seed, words)`` always gives the same
text, in every process, on every machine.

Words are drawn from a fixed vocabulary of made-up words with Zipf-like
frequencies (a few very common words, a long tail of rare ones), so a chunk
has tens of thousands of distinct words and the shuffle carries real data.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import random
import re
import zlib

SYLLABLES = (
    "ka",
    "lo",
    "mi",
    "ne",
    "ru",
    "ta",
    "so",
    "vi",
    "pe",
    "da",
    "gu",
    "ri",
    "ban",
    "tor",
    "el",
    "an",
    "is",
    "om",
    "ul",
    "ex",
    "qua",
    "zen",
    "fy",
    "wo",
)
VOCABULARY_SIZE = 200_000
ZIPF_EXPONENT = 1.0
VOCABULARY_SEED = 20240601

_WORD = re.compile(r"[a-z]+")
_vocabulary: list[str] | None = None
_cum_weights: list[float] | None = None


def vocabulary() -> list[str]:
    """The fixed vocabulary, most frequent word first (built once per process)."""
    global _vocabulary, _cum_weights
    if _vocabulary is None:
        words = ["".join(parts) for n in range(1, 5) for parts in itertools.product(SYLLABLES, repeat=n)]
        # Two syllable sequences could spell the same word with another
        # syllable set; keep the first occurrence so every word is listed once.
        words = list(dict.fromkeys(words))
        random.Random(VOCABULARY_SEED).shuffle(words)
        _vocabulary = words[:VOCABULARY_SIZE]
        _cum_weights = list(itertools.accumulate(1.0 / (rank + 1) ** ZIPF_EXPONENT for rank in range(len(_vocabulary))))
    return _vocabulary


def generate_text(seed: int, words: int) -> str:
    """A chunk of ``words`` words of text: sentences with capitals and punctuation."""
    vocab = vocabulary()
    rng = random.Random(seed)
    drawn = rng.choices(vocab, cum_weights=_cum_weights, k=words)
    out: list[str] = []
    start = True
    for word in drawn:
        if start:
            word = word.capitalize()
            start = False
        r = rng.random()
        if r < 0.07:
            word += "."
            start = True
        elif r < 0.12:
            word += ","
        out.append(word)
    return " ".join(out)


def tokenize(text: str) -> list[str]:
    """The words of ``text``, lower-cased, punctuation dropped."""
    return _WORD.findall(text.lower())


def partition(word: str, reducers: int) -> int:
    """Which reducer counts ``word``: stable across processes.

    (Python's ``hash()`` of a string differs from one process to the next,
    so it cannot be used to agree on a partition between machines.)
    """
    return zlib.crc32(word.encode("utf-8")) % reducers


def count_words(text: str) -> collections.Counter:
    return collections.Counter(tokenize(text))


def split_counts(counts: dict[str, int], reducers: int) -> list[dict[str, int]]:
    """``counts`` split into one dict per reducer."""
    parts: list[dict[str, int]] = [{} for _ in range(reducers)]
    for word, n in counts.items():
        parts[partition(word, reducers)][word] = n
    return parts


def top_words(counts: dict[str, int], n: int) -> list[list]:
    """The ``n`` most frequent words as ``[word, count]``, ties broken alphabetically."""
    return [[w, c] for w, c in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:n]]


def counts_digest(counts: dict[str, int]) -> str:
    """SHA-256 of the counts in a canonical form: equal digests, equal counts."""
    canonical = json.dumps(sorted(counts.items()), separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def expected_result(seeds: list[int], words: int, reducers: int, top: int = 10) -> dict:
    """The answer computed in one process, without TaskSprint: for checking a run."""
    total: collections.Counter = collections.Counter()
    for seed in seeds:
        total.update(count_words(generate_text(seed, words)))
    parts = split_counts(total, reducers)
    return {
        "total_words": sum(total.values()),
        "distinct_words": len(total),
        "top": top_words(total, top),
        "partition_digests": [counts_digest(p) for p in parts],
    }
