"""Work shared by the processes of one `accelerate launch` (or `torchrun`): who does which share, and
how the shares come back together. In a plain single process every function here is the trivial one.

    dt-lora train ...                                            # one process
    accelerate launch --multi_gpu --num_processes 2 -m dt_lora train ...   # two GPUs, one command

Item i of a split goes to process i mod N and its result depends only on i (an image's seed is its
index), so N processes produce what one does. `gather` puts the shares back in item order on every
process; outputs are written by the main process only.

Inside `alone()` a process works as if it were the only one: a library of shields trains each concept
on one process that way, so that the processes share the concepts out and none waits for another.

On CPU, several processes form one group only when `ACCELERATE_USE_CPU=1` is set (`accelerate launch
--cpu --num_processes 2` starts a single process; accelerate's multi-CPU launch otherwise needs MPI):

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 -m dt_lora train ...
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def launcher(processes: int, port: int | None = None) -> list[str]:
    """The command that starts `processes` processes of what follows it (`-m MODULE ...` or a script):
    the plain interpreter for one, accelerate's launcher for more (one machine; on CPU set
    `ACCELERATE_USE_CPU=1` in the environment). The benchmarks and tests launch with it."""
    import sys

    if processes == 1:
        return [sys.executable]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return command + (["--main_process_port", str(port)] if port is not None else [])


_alone = False


class _Alone:
    """What `state()` says inside `alone()`: this process on its own device, the only one."""

    num_processes = 1
    process_index = 0
    is_main_process = True

    def __init__(self, device) -> None:
        self.device = device

    def wait_for_everyone(self) -> None:
        pass


def state():
    """accelerate's `PartialState`, made as `Accelerator` makes it (so both agree on CPU runs); inside
    `alone()`, a single process's state on the same device."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    real = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    return _Alone(real.device) if _alone else real


@contextmanager
def alone() -> Iterator[None]:
    """Inside, every function here answers as in a plain single process: this process splits nothing,
    gathers only its own results and waits for no one. Its work must not depend on the others'."""
    global _alone
    previous, _alone = _alone, True
    try:
        yield
    finally:
        _alone = previous


def processes() -> int:
    return state().num_processes


def is_main() -> bool:
    return state().is_main_process


def wait() -> None:
    """Every process waits here until all have arrived."""
    state().wait_for_everyone()


def mine(count: int) -> range:
    """The indices of `count` items that this process works on: i with i mod N == this process."""
    s = state()
    return range(s.process_index, count, s.num_processes)


def gather(local: list[tuple[int, R]]) -> list[R]:
    """(index, result) pairs from every process → all results in index order, on every process."""
    if processes() > 1:
        from accelerate.utils import gather_object

        local = gather_object(local)
    return [result for _, result in sorted(local, key=lambda pair: pair[0])]


def split_map(function: Callable[[T], R], items: Sequence[T]) -> list[R]:
    """`[function(item) for item in items]`, each item computed by one process, the list on all.
    Results travel between processes pickled: return CPU tensors or arrays."""
    return gather([(i, function(items[i])) for i in mine(len(items))])
