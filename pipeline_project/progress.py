"""How far a long stage has got, for whoever runs the batch in this process.

Stages call `report` after each chunk (they log the same figures to the run's log). The
`pipeline-project demo` listens with `listening` and draws a progress bar per stage; a run in
its own process (the daemon, `dagster dev`) has no listener, and a report costs nothing.
"""

from __future__ import annotations

import time
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


# A long step logs how far it has got at most this often (and when it is done), whether or not
# anybody watches a terminal: a step whose output goes to a file still says where it is.
LOG_EVERY_SECONDS = 5.0


class Progress:
    """Called after each chunk with (done, total): reports it to listeners, and logs a line
    at most every LOG_EVERY_SECONDS seconds, and at the end."""

    def __init__(self, log, batch_id: str, stage: str, unit: str,
                 every: float = LOG_EVERY_SECONDS) -> None:  # fmt: skip
        self.log, self.batch_id, self.stage, self.unit, self.every = (
            log, batch_id, stage, unit, every
        )  # fmt: skip
        self._started = self._logged = time.monotonic()

    def __call__(self, done: int, total: int | None) -> None:
        report(self.batch_id, self.stage, done, total, self.unit)
        now = time.monotonic()
        if now - self._logged >= self.every or (total is not None and done >= total):
            self._logged = now
            of = f" of {total:,}" if total is not None else ""
            self.log.info(
                f"{self.batch_id}: {self.stage} {done:,}{of} {self.unit}"
                f" ({now - self._started:.0f} s)"
            )
