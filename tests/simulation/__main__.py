"""`python -m tests.simulation --seeds N [--first S]` runs N seeds; `--seed S` replays one, printing its
steps.
`make simulate SEEDS=N` / `make simulate SEED=S` call this."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from tests.simulation.model import PropertyViolated
from tests.simulation.simulator import simulate


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.simulation")
    parser.add_argument("--seeds", type=int, default=2_000, help="how many seeds to run")
    parser.add_argument("--first", type=int, default=0, help="the first seed")
    parser.add_argument("--seed", type=int, default=None, help="replay this one seed and print its trace")
    args = parser.parse_args()
    logging.disable(logging.WARNING)  # dead letters are expected; the simulation checks them itself
    seeds = [args.seed] if args.seed is not None else range(args.first, args.first + args.seeds)
    started = time.monotonic()
    for seed in seeds:
        try:
            simulation = simulate(seed)
        except PropertyViolated as error:
            print(error, file=sys.stderr)
            return 1
        if args.seed is not None:
            print("\n".join(simulation.trace))
    print(f"{len(seeds)} seeds passed in {time.monotonic() - started:.1f} s (first {seeds[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
