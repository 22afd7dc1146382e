"""The P/D path's timing, engine-free: pd.transfer.timeline's marks (off unless
PD_TIMELINE names a file), the serving benchmark's split of one request's overhead
from them, and the decode consumer reporting a load before it releases the lease."""

from __future__ import annotations

import threading
import time

import pytest

from pd.decode.kv_consumer import KVConsumer
from pd.transfer import timeline
from pd.transfer.metadata import LoadSpec
from pd.transfer.stats import TransferCounters
from scripts.serving_bench.overhead import FIRST_TOKEN_STEPS, TIMELINE_STEPS, timeline_steps


@pytest.fixture
def fresh_timeline(monkeypatch):
    """The module reads PD_TIMELINE once per process: reset it around each test."""
    monkeypatch.setattr(timeline, "_checked", False)
    monkeypatch.setattr(timeline, "_fd", None)
    yield
    timeline._checked = False
    timeline._fd = None


def test_marks_are_written_only_when_a_file_is_named(fresh_timeline, monkeypatch, tmp_path):
    monkeypatch.delenv("PD_TIMELINE", raising=False)
    timeline.mark("sched_seen", "r1")
    assert not timeline.enabled() and not list(tmp_path.iterdir())

    path = tmp_path / "timeline.jsonl"
    monkeypatch.setenv("PD_TIMELINE", str(path))
    timeline._checked = False
    timeline.mark("load_started", "r1")
    timeline.mark("load_ended", "r1")
    marks = timeline.read(str(path))
    assert [(m["ev"], m["rid"]) for m in marks] == [("load_started", "r1"), ("load_ended", "r1")]
    assert marks[0]["t"] <= marks[1]["t"]


def test_the_overhead_is_split_at_each_mark_of_the_request_in_its_window(tmp_path):
    events = [e for e, _ in TIMELINE_STEPS if e not in ("first_token", "client")]
    marks, windows = [], []
    for start in (100.0, 200.0):  # two requests, 1 ms between consecutive marks
        marks += [{"ev": e, "rid": "x", "t": start + 0.001 * (i + 1)} for i, e in enumerate(events)]
        windows.append((start, start + 0.001 * (len(events) + 2)))
    marks.append({"ev": "load_started", "rid": "late", "t": 100.5})  # outside both windows
    rows = tmp_path / "rows.json"
    steps = timeline_steps(marks, windows, [{"prefill": 0.004}] * 2, [True, True], rows)
    assert steps["requests"] == 2
    by_event = {key.split(":")[0]: ms for key, ms in steps.items() if ":" in key}
    assert by_event["load_ended"] == pytest.approx(1.0)
    # The first token is the compute step plus decode's own prefill time (4 ms); the
    # proxy's first chunk came 1 ms after compute_scheduled, so that step reads -3 ms.
    assert by_event["first_token"] == pytest.approx(4.0)
    assert by_event["proxy_first_chunk"] == pytest.approx(-3.0)
    total = 1000 * (windows[0][1] - (windows[0][0] + 0.001))
    assert steps["total (proxy_prefill_answer -> client)"] == pytest.approx(total)
    assert rows.exists()
    # A request that went another way (first token from the prefill leg) is left out,
    # and so is one missing a mark.
    assert timeline_steps(marks, windows, [{"prefill": 0.004}] * 2, [False, True])["requests"] == 1
    assert timeline_steps(marks[1:], windows[:1], [{"prefill": 0.004}], [True]) == {}


def test_a_first_token_request_is_split_from_the_client_sending_it():
    """The first-token path: nothing of decode's, and its first step is the client's."""
    path = [e for e, _ in FIRST_TOKEN_STEPS if e not in ("client_sent", "client")]
    marks = [{"ev": e, "rid": "x", "t": 100.0 + 0.002 * (i + 1)} for i, e in enumerate(path)]
    steps = timeline_steps(marks, [(100.0, 100.01)], [{}], [True], path=FIRST_TOKEN_STEPS)
    assert steps["requests"] == 1
    by_event = {key.split(":")[0]: ms for key, ms in steps.items() if ":" in key}
    assert list(by_event) == [e for e, _ in FIRST_TOKEN_STEPS[1:]]
    assert by_event["proxy_prefill_sent"] == pytest.approx(2.0)
    assert by_event["client"] == pytest.approx(4.0)
    assert steps["total (client_sent -> client)"] == pytest.approx(10.0)
    # The sequential path's marks are not there: no row for it.
    assert timeline_steps(marks, [(100.0, 100.01)], [{}], [True]) == {}


def test_a_load_is_reported_before_its_lease_is_released():
    """The release is a round trip to the prefill instance; vLLM need not wait for it."""
    consumer = KVConsumer("decode-engine", 0, [], 5, 1, 5, 2, TransferCounters())
    consumer.start()
    may_release, released = threading.Event(), threading.Event()

    def slow_release(*args, **kwargs) -> None:
        may_release.wait(10)
        released.set()

    assert consumer._side_channel is not None
    consumer._side_channel.release = slow_release  # type: ignore[method-assign]
    try:
        # No local blocks: nothing to read, the load ends at once and releases the lease.
        consumer.submit([LoadSpec("r", "p-r", "prefill-engine", "127.0.0.1", (1,), (), (),
                                  reports_completion=True)])  # fmt: skip
        finished: set[str] = set()
        deadline = time.monotonic() + 5
        while not finished and time.monotonic() < deadline:
            finished = consumer.take_results().finished
            time.sleep(0.01)
        assert finished == {"r"}
        assert not released.is_set()  # still on its way to prefill
    finally:
        may_release.set()
    assert released.wait(5)
    consumer.close()
