#!/usr/bin/env python3
"""Word count, the scheduler: map -> shuffle -> reduce -> merge.

``MAPS`` map tasks each generate and count a chunk of text (seeded from the
computation's seed through ``self.random``, so every replica picks the same
chunks).  Reduce task ``r`` takes output ``p{r}`` of every map task: that is
the shuffle, several MB moving between the clients, never through the
replicas.  One merge task combines the reducers' summaries; its result ends
the computation, together with the chunk seeds so anyone can check it.

Run it with
``tasksprint run examples/wordcount/scheduler.py:WordCountCoordinator --node "python examples/wordcount/node.py"``.
"""

from tasksprint import Coordinator

MAPS = 8
REDUCERS = 4
WORDS_PER_CHUNK = 400_000
TOP = 10


class WordCountCoordinator(Coordinator):
    def init(self, seed):
        self.seeds = [self.random.getrandbits(32) for _ in range(MAPS)]
        self.maps = [
            self.start_task(name="map", args=[s, WORDS_PER_CHUNK, REDUCERS], keys=["stats"]) for s in self.seeds
        ]
        self.reducers = [
            self.start_task(
                name="reduce",
                pretasks=self.maps,
                prekeys=["p%d" % r] * MAPS,
                kwargs={"partition": r, "top": TOP},
                keys=["summary"],
            )
            for r in range(REDUCERS)
        ]
        self.final = self.start_task(
            name="merge",
            pretasks=self.reducers,
            prekeys=["summary"] * REDUCERS,
            kwargs={"top": TOP},
            keys=["result"],
        )
        self.shuffle_bytes = 0

    def task_done(self, tid, values):
        if tid in self.maps:
            self.shuffle_bytes += values["stats"]["shuffle_bytes"]
            print("map %d: %s" % (tid, values["stats"]))
        elif tid == self.final:
            self.finish(
                taskids=[tid],
                values={
                    "result": values["result"],
                    "corpus": {"seeds": self.seeds, "words_per_chunk": WORDS_PER_CHUNK},
                    "maps": MAPS,
                    "reducers": REDUCERS,
                    "shuffle_bytes": self.shuffle_bytes,
                },
            )


WordCountCoordinator().start()
