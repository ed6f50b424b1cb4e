#!/usr/bin/env python3
"""Genetic algorithm, the scheduler: group similar genomes, breed within groups.

The problem (see ``landscape.py``) has several peaks; the scheduler draws
them with ``self.random``, so every replica poses the same problem.

Generation 0 is ``POPULATION`` random genomes made by ``populate`` tasks.
After each generation the scheduler, holding every member's genome and
fitness from ``task_done``:

1. keeps the best ``POPULATION`` distinct genomes of parents and children;
2. groups them by similarity: in order of fitness, each genome joins the
   first group whose leader is within ``RADIUS`` bits (Hamming distance),
   or leads a new group;
3. picks each child's first parent by a tournament over everyone and its
   second parent by a tournament inside the first parent's group, so
   crossover mixes genomes climbing the same peak (a lone genome is
   only mutated);
4. starts ``TASKS`` ``breed`` tasks sharing the pairs.

After ``GENERATIONS`` generations it finishes with the best genome, its
fitness, the best fitness of the random generation 0 and the problem itself.

Run it with
``tasksprint run examples/genetic/scheduler.py:GeneticCoordinator --node "python examples/genetic/node.py"``.
"""

from tasksprint import Coordinator

BITS = 96
WEIGHTS = [1.0, 0.9, 0.85, 0.8]  # one peak per weight; the first is the global optimum
POPULATION = 48
GENERATIONS = 30
TASKS = 8  # tasks per generation
RADIUS = 40  # Hamming distance that makes two genomes "similar"
MUTATION = 1.0 / BITS  # chance to flip each bit


def hamming(a, b):
    return sum(x != y for x, y in zip(a, b))


def ranked(members):
    """Distinct genomes, best first (ties by genome, so the order is the same everywhere)."""
    best = {}
    for genome, fit in members:
        best[genome] = fit
    return sorted(([g, f] for g, f in best.items()), key=lambda m: (-m[1], m[0]))


def group(population, radius):
    """Leader clustering of a ranked population: lists of member indices."""
    leaders, groups = [], []
    for i, (genome, _) in enumerate(population):
        for k, leader in enumerate(leaders):
            if hamming(genome, population[leader][0]) <= radius:
                groups[k].append(i)
                break
        else:
            leaders.append(i)
            groups.append([i])
    return groups


class GeneticCoordinator(Coordinator):
    def init(self, seed):
        self.targets = ["".join(self.random.choice("01") for _ in range(BITS)) for _ in WEIGHTS]
        self.generation = 0
        self.population = []
        self.incoming = []
        self.history = []
        self.groups_seen = []
        per_task = -(-POPULATION // TASKS)
        self.waiting = [
            self.start_task(name="populate", args=[per_task, BITS, self.targets, WEIGHTS], keys=["members"])
            for _ in range(TASKS)
        ]

    def task_done(self, tid, values):
        if tid not in self.waiting:
            return
        self.waiting.remove(tid)
        self.incoming.extend(values["members"])
        if not self.waiting:
            self.next_generation()

    def tournament(self, indices):
        a, b = self.random.choice(indices), self.random.choice(indices)
        return min(a, b)  # the population is ranked: a lower index is fitter

    def next_generation(self):
        self.population = ranked(self.population + self.incoming)[:POPULATION]
        self.incoming = []
        best_genome, best_fitness = self.population[0]
        if self.generation == 0:
            self.initial_best = best_fitness
        self.history.append(best_fitness)
        if self.generation == GENERATIONS:
            self.finish(
                values={
                    "best_genome": best_genome,
                    "best_fitness": best_fitness,
                    "initial_best_fitness": self.initial_best,
                    "history": self.history,
                    "groups": self.groups_seen,
                    "targets": self.targets,
                    "weights": WEIGHTS,
                    "generations": GENERATIONS,
                    "population": POPULATION,
                }
            )
            return
        groups = group(self.population, RADIUS)
        self.groups_seen.append(len(groups))
        group_of = {}
        for members in groups:
            for i in members:
                group_of[i] = members
        everyone = list(range(len(self.population)))
        pairs = []
        for _ in range(POPULATION):
            first = self.tournament(everyone)
            second = self.tournament(group_of[first])
            pairs.append([self.population[first][0], self.population[second][0]])
        self.generation += 1
        share = -(-len(pairs) // TASKS)
        self.waiting = [
            self.start_task(
                name="breed",
                args=[pairs[i : i + share], self.targets, WEIGHTS, MUTATION],
                keys=["members"],
            )
            for i in range(0, len(pairs), share)
        ]


GeneticCoordinator().start()
