"""Make data outages visible: warn while no batch arrives, fail with a clear error after a limit.

`watch_stalls(iterable, source=..., warn_s=60, timeout_s=1800)` yields what `iterable` yields. A helper thread pulls
one item each time the consumer asks for the next one (no read-ahead beyond the source's own prefetching, so an
abandoned epoch consumes nothing more), while the consumer waits in slices of `warn_s`: each slice without an item logs
a warning naming the source and the time waited, and once `timeout_s` has passed it raises `DataStallError`
(a TimeoutError). `timeout_s=0` waits forever (still warning).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")
_ITEM, _END, _ERROR = "item", "end", "error"


class DataStallError(TimeoutError):
    """No batch arrived from a data source within the configured limit."""


class _Producer(threading.Thread):
    """Fetches one item of `iterable` per `demand` release and puts (kind, value) on `out`."""

    def __init__(self, iterable: Iterable[Any], source: str) -> None:
        super().__init__(daemon=True, name=f"data-watch[{source}]")
        self.iterable = iterable
        self.demand = threading.Semaphore(0)
        self.stop = threading.Event()
        self.out: queue.Queue[tuple[str, Any]] = queue.Queue()

    def run(self) -> None:
        iterator = iter(self.iterable)
        try:
            while True:
                self.demand.acquire()
                if self.stop.is_set():
                    return
                try:
                    item = next(iterator)
                except StopIteration:
                    self.out.put((_END, None))
                    return
                self.out.put((_ITEM, item))
        except BaseException as err:  # handed to the consumer, re-raised there
            self.out.put((_ERROR, err))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()


def watch_stalls(iterable: Iterable[T], *, source: str, warn_s: float = 60.0, timeout_s: float = 0.0) -> Iterator[T]:
    """Yield the items of `iterable`, warning every `warn_s` seconds without one, failing after `timeout_s`.

    Raises:
        DataStallError: no item for `timeout_s` seconds (when > 0); the message names the source.
        Whatever `iterable` raises, unchanged.
    """
    if warn_s <= 0:
        raise ValueError(f"warn_s must be > 0, got {warn_s}")
    producer = _Producer(iterable, source)
    producer.start()
    try:
        while True:
            producer.demand.release()
            kind, value = _wait(producer, source, warn_s, timeout_s)
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        producer.stop.set()
        producer.demand.release()  # wake it so it exits without pulling another item


def _wait(producer: _Producer, source: str, warn_s: float, timeout_s: float) -> tuple[str, Any]:
    started = time.monotonic()
    while True:
        try:
            return producer.out.get(timeout=warn_s)
        except queue.Empty:
            waited = time.monotonic() - started
        limit = f"failing after {timeout_s:.0f} s (data.stall_timeout_s)" if timeout_s else "waiting without limit"
        logger.warning("no batch from %s for %.0f s; still waiting, %s", source, waited, limit)
        if timeout_s and waited >= timeout_s:
            raise DataStallError(
                f"no batch from {source} for {waited:.0f} s (data.stall_timeout_s={timeout_s:g}): is the storage "
                "endpoint reachable and are Ray Data tasks getting CPUs?"
            )
