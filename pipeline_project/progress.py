"""How far a long stage has got, for whoever runs the batch in this process.

Stages call `report` after each chunk (they log the same figures to the run's log). The
`pipeline-project demo` listens with `listening` and draws a progress bar per stage; a run in
its own process (the daemon, `dagster dev`) has no listener, and a report costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

# batch ID, stage, done, total (None: not known in advance), unit of done and total
Listener = Callable[[str, str, int, "int | None", str], None]
_listeners: list[Listener] = []


def report(batch_id: str, stage: str, done: int, total: int | None, unit: str) -> None:
    for listener in tuple(_listeners):
        listener(batch_id, stage, done, total, unit)


@contextmanager
def listening(listener: Listener) -> Iterator[None]:
    _listeners.append(listener)
    try:
        yield
    finally:
        _listeners.remove(listener)
