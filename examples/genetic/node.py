#!/usr/bin/env python3
"""Genetic algorithm, the node: make and evaluate genomes.

``populate`` draws random genomes; ``breed`` makes one child per pair of
parents by uniform crossover and bit-flip mutation.  Both use
``self.random``, which TaskSprint seeds for each task, so a task run twice
(say after a worker died) breeds the same children.  Each returns its
genomes with their fitness as ``[[genome, fitness], ...]``.
"""

import landscape

from tasksprint import Node


class GeneticNode(Node):
    def populate(self, count, bits, targets, weights):
        members = []
        for _ in range(count):
            genome = landscape.random_genome(self.random, bits)
            members.append([genome, landscape.fitness(genome, targets, weights)])
        return {"members": members}

    def breed(self, pairs, targets, weights, mutation):
        members = []
        for a, b in pairs:
            child = landscape.crossover(a, b, self.random) if a != b else a
            child = landscape.mutate(child, mutation, self.random)
            members.append([child, landscape.fitness(child, targets, weights)])
        return {"members": members}


GeneticNode().start()
