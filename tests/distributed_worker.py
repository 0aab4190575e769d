"""``torchrun`` entry point for tests: the ``swamp`` command line, with a fault on rank 1 (rank 0
for ``crash_rank_0``).

    torchrun ... tests/distributed_worker.py {stall,crash,crash_rank_0,stall_in_step,slow} swamp-arguments...

``stall`` makes rank 1 sleep forever and ``crash`` makes it exit, when it first evaluates a
network (after the first level's training): the other ranks are then waiting in a collective.
``stall_in_step`` makes it sleep forever at its third training step of a one-particle stage:
its data-parallel partners then wait in DDP's gradient all-reduce. ``slow`` is no fault: every
training step of every rank takes 20 ms longer, so a test can stop the job while it trains.
"""
import os
import sys
import time

from swamp import cli, evaluate, train


def _fault(kind: str):
    def faulty(*args, **kwargs):
        if kind == "stall":
            time.sleep(3600)
        os._exit(3)
    return faulty


if __name__ == "__main__":
    kind = sys.argv[1]
    faulty_rank, kind = ("0", "crash") if kind == "crash_rank_0" else ("1", kind)
    if kind == "slow":
        for engine in (train.ModuleEngine, train.StackedEngine):
            def slow_step(self, *args, step=engine.step):
                time.sleep(0.02)
                return step(self, *args)
            engine.step = slow_step
    elif os.environ.get("RANK") == faulty_rank and kind == "stall_in_step":
        step, steps = train.ModuleEngine.step, []

        def stalling_step(self, *args):
            steps.append(1)
            return _fault("stall")() if len(steps) == 3 else step(self, *args)
        train.ModuleEngine.step = stalling_step
    elif os.environ.get("RANK") == faulty_rank:
        evaluate.probabilities = _fault(kind)
    sys.exit(cli.main(sys.argv[2:]))
