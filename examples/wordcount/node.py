#!/usr/bin/env python3
"""Word count, the node: map a generated chunk of text, reduce one partition, merge.

``map`` generates its chunk of text from a seed (see ``corpus.py``), counts
the words and splits the counts into one output per reducer, ``p0`` ..
``p{R-1}``.  Those outputs stay on the client that made them; each ``reduce``
task receives its partition from every map, fetched peer to peer.  Only the
small ``stats`` and ``summary`` outputs travel to the coordinator.
"""

import json

import corpus

from tasksprint import Node


class WordCountNode(Node):
    def map(self, seed, words, reducers):
        text = corpus.generate_text(seed, words)
        counts = corpus.count_words(text)
        parts = corpus.split_counts(counts, reducers)
        outputs = {"p%d" % r: part for r, part in enumerate(parts)}
        outputs["stats"] = {
            "text_bytes": len(text),
            "words": sum(counts.values()),
            "distinct": len(counts),
            "shuffle_bytes": sum(len(json.dumps(part, separators=(",", ":"))) for part in parts),
        }
        return outputs

    def reduce(self, *parts, partition, top=10):
        counts = {}
        for part in parts:
            for word, n in part.items():
                counts[word] = counts.get(word, 0) + n
        summary = {
            "partition": partition,
            "total": sum(counts.values()),
            "distinct": len(counts),
            "top": corpus.top_words(counts, top),
            "digest": corpus.counts_digest(counts),
        }
        return {"counts": counts, "summary": summary}

    def merge(self, *summaries, top=10):
        # Partitions hold disjoint words, so the overall top words are among
        # the top words of the partitions.
        candidates = {}
        for s in summaries:
            for word, n in s["top"]:
                candidates[word] = n
        ordered = sorted(summaries, key=lambda s: s["partition"])
        return {
            "result": {
                "total_words": sum(s["total"] for s in summaries),
                "distinct_words": sum(s["distinct"] for s in summaries),
                "top": corpus.top_words(candidates, top),
                "partition_digests": [s["digest"] for s in ordered],
            }
        }


WordCountNode().start()
