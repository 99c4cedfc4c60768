"""Data outages are visible: warnings naming the source while no batch arrives, a clear error after the limit, and no
extra item consumed when the consumer stops early. Every wait below ends on a condition, not on a sleep."""

import logging
import threading

import pytest

from arm_platform.data.watchdog import DataStallError, watch_stalls


class _Gate:
    """An iterable that yields 0, then blocks until `release` is set, then yields 1 and 2; counts items pulled."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.pulled = 0

    def __iter__(self):
        for item in range(3):
            if item == 1:
                self.release.wait()
            self.pulled += 1
            yield item


class _ReleaseOnWarning(logging.Handler):
    def __init__(self, gate: _Gate) -> None:
        super().__init__()
        self.gate, self.messages = gate, []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())
        self.gate.release.set()


def test_stall_is_logged_naming_the_source_then_data_recovers():
    gate = _Gate()
    handler = _ReleaseOnWarning(gate)
    logger = logging.getLogger("arm_platform.data.watchdog")
    logger.addHandler(handler)
    try:
        items = list(watch_stalls(gate, source="the train dataset of s3://b/imagenet", warn_s=0.05, timeout_s=0))
    finally:
        logger.removeHandler(handler)
    assert items == [0, 1, 2]
    assert handler.messages and "no batch from the train dataset of s3://b/imagenet" in handler.messages[0]
    assert "waiting without limit" in handler.messages[0]


def test_outage_longer_than_the_limit_fails_with_a_clear_error(caplog):
    gate = _Gate()  # never released: the source is down for good
    caplog.set_level(logging.WARNING, logger="arm_platform.data.watchdog")
    stream = watch_stalls(gate, source="the val dataset of /data/shards", warn_s=0.05, timeout_s=0.2)
    assert next(stream) == 0
    with pytest.raises(DataStallError, match=r"no batch from the val dataset of /data/shards for \d+ s"):
        next(stream)
    assert any("failing after 0 s (data.stall_timeout_s)" in r.getMessage() for r in caplog.records)
    gate.release.set()  # let the helper thread finish


def test_errors_of_the_source_reach_the_consumer_unchanged():
    def broken():
        yield 1
        raise OSError("S3 GetObject failed for s3://b/train/shard-00001.parquet")

    stream = watch_stalls(broken(), source="x", warn_s=10)
    assert next(stream) == 1
    with pytest.raises(OSError, match="shard-00001"):
        next(stream)


def test_stopping_early_pulls_nothing_more_from_the_source():
    pulled = []
    done = threading.Event()

    def source():
        try:
            for i in range(100):
                pulled.append(i)
                yield i
        finally:
            done.set()  # closed by the helper thread once the consumer stops

    stream = watch_stalls(source(), source="x", warn_s=10)
    assert [next(stream), next(stream)] == [0, 1]
    stream.close()
    assert done.wait(timeout=60)
    assert pulled == [0, 1]


def test_batch_iterable_fails_naming_its_source_when_the_shard_stalls():
    """The training loop's iterator is wired to the watchdog: a shard that never yields ends in DataStallError."""
    from arm_platform.data.datasets import iter_batches

    never = threading.Event()

    class StalledShard:
        def iter_torch_batches(self, **kwargs):
            never.wait()
            yield {}

    batches = iter_batches(
        StalledShard(), 4, "cpu", drop_last=True, source="the train dataset of s3://b/x", stall_warn_s=0.05,
        stall_timeout_s=0.1,
    )  # fmt: skip
    with pytest.raises(DataStallError, match="the train dataset of s3://b/x"):
        next(iter(batches))
    never.set()
