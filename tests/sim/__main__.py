"""Replay one seed and print its last events: ``python -m tests.sim SEED [N]``."""

import sys

from .simulation import Simulation

seed_arg = int(sys.argv[1])
n_arg = int(sys.argv[2]) if len(sys.argv) > 2 else 3
s = Simulation(seed_arg, n_arg)
s.trace = []
try:
    s.run()
    print("ok", s.knobs, s.describe())
finally:
    print("\n".join(s.trace[-200:]))
