"""What the Triton launchers launched: launch counts per kernel, and the launch records of ``recording()``.

The C++ launch path (``lora_ops._launch``, ``csrc/lora_launch.cpp``) learns its kernels from these records: the
first call of a new configuration runs the Python launchers inside ``recording()``, and each ``Record`` gives the
compiled kernel, its config and the exact arguments and grid the launcher passed, against which the C++ side
checks its own argument lists before it launches anything itself.
"""
from __future__ import annotations

import collections
import collections.abc
import contextlib
from typing import Dict, List, NamedTuple, Optional, Tuple


class _LaunchCounts(collections.abc.MutableMapping):
    """Kernel name -> number of launches since import, from the Python launchers and the C++ launch path together;
    tests read it to prove the Triton kernels ran. Missing names count 0, as in a Counter."""

    def __init__(self):
        self._py: collections.Counter = collections.Counter()

    @staticmethod
    def _cpp() -> Dict[str, int]:
        from lora_ops import _launch
        return _launch.launch_counts()

    def bump(self, name: str) -> None:
        self._py[name] += 1

    def __getitem__(self, name: str) -> int:
        return self._py.get(name, 0) + self._cpp().get(name, 0)

    def __setitem__(self, name: str, value: int) -> None:
        self._py[name] = value - self._cpp().get(name, 0)

    def __delitem__(self, name: str) -> None:
        del self._py[name]

    def __iter__(self):
        return iter(sorted(set(self._py) | {k for k, v in self._cpp().items() if v}))

    def __len__(self) -> int:
        return sum(1 for _ in self)


LAUNCHES = _LaunchCounts()


class Record(NamedTuple):
    """One launch of a Triton kernel as a launcher made it."""
    name: str  # the kernel's launch-count name (lora_s, lora_fwd, ..., nf4_dequant)
    fn: object  # the triton.JITFunction
    grid: Tuple[int, int, int]
    args: tuple  # positional arguments, as passed
    named: Dict[str, object]  # constexprs, config included (BLOCK_M, ..., num_warps)
    kernel: object  # the CompiledKernel (None under the interpreter)


# Set by ``recording``: the launches made inside it are appended here.
RECORDS: Optional[List[Record]] = None


@contextlib.contextmanager
def recording():
    """Collect the ``Record`` of every Triton launch made inside the block. The launchers run with the GIL held
    and record nothing outside a block, so one module-level list is enough."""
    global RECORDS
    previous, RECORDS = RECORDS, []
    try:
        yield RECORDS
    finally:
        RECORDS = previous


def record(name: str, fn, grid, args: tuple, named: Dict[str, object], kernel) -> None:
    """Append a launch to the open ``recording`` (grid: a tuple, or Triton's callable of the constexprs)."""
    if RECORDS is None:
        return
    g = grid(named) if callable(grid) else grid
    RECORDS.append(Record(name, fn, (g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1), tuple(args),
                          named, kernel))
