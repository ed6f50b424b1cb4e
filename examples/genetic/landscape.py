"""The genetic example's problem: a fitness landscape over bit strings with several peaks.

A genome is a string of ``"0"``/``"1"``.  The landscape has a few hidden
target strings (the peaks), each with a weight; a genome's fitness is the
best over the peaks of ``weight * (fraction of bits matching that target)``,
so the global optimum is the target of the heaviest peak, with fitness 1.0.

Crossing two parents that climb different peaks mostly gives children that
fit neither, which is why the scheduler pairs parents from the same group
of similar genomes.  The node and the tests use this module; the scheduler
only needs genomes and fitness values.
"""

from __future__ import annotations

import random


def matches(a: str, b: str) -> int:
    """Number of positions where the bit strings ``a`` and ``b`` agree."""
    return sum(x == y for x, y in zip(a, b))


def fitness(genome: str, targets: list[str], weights: list[float]) -> float:
    """Best ``weight * matching fraction`` over the peaks, rounded to 6 places."""
    bits = len(genome)
    return round(max(w * matches(genome, t) / bits for t, w in zip(targets, weights)), 6)


def random_genome(rng: random.Random, bits: int) -> str:
    return "".join("1" if rng.random() < 0.5 else "0" for _ in range(bits))


def crossover(a: str, b: str, rng: random.Random) -> str:
    """Uniform crossover: each bit from either parent with equal chance."""
    return "".join(x if rng.random() < 0.5 else y for x, y in zip(a, b))


def mutate(genome: str, rate: float, rng: random.Random) -> str:
    """Flip each bit with probability ``rate``."""
    return "".join(("1" if g == "0" else "0") if rng.random() < rate else g for g in genome)
