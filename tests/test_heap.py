import gc
import weakref

from catdog import heap


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_settle_freezes_only_inside_a_run_and_the_run_hands_everything_back():
    gc.unfreeze()
    heap.settle()
    assert heap.frozen() == 0  # outside a run (a cluster's worker): nothing frozen

    with heap.run_heap():
        garbage = Node()
        dead = weakref.ref(garbage)
        del garbage
        alive = Node()
        kept = weakref.ref(alive)
        heap.settle()
        assert dead() is None  # garbage at a settle is collected, not frozen
        assert heap.frozen() > 0
        del alive
        gc.collect()
        assert kept() is not None  # frozen: out of the collector's sight until the run ends
    assert heap.frozen() == 0
    gc.collect()
    assert kept() is None  # handed back, and collected as usual


def test_nested_runs_unfreeze_when_the_last_one_ends():
    gc.unfreeze()
    with heap.run_heap():
        with heap.run_heap():
            heap.settle()
        assert heap.frozen() > 0
    assert heap.frozen() == 0
