"""The compute pool's order (arrival order while its queue moves, newest first once it stands), its
cancellation and shutdown, in-process; then a real server on loopback whose pool serves a newer
request before an older one once the older has waited past --lifo-after-ms."""

from __future__ import annotations

import threading
import time
from functools import partial

import numpy as np
import pytest
import tritonclient.grpc as triton
from hypothesis import given, settings
from hypothesis import strategies as st

from serving import InferenceServer, ServerConfig
from serving.compute_pool import ComputePool
from serving.errors import InvalidRequest
from serving.oip import decode_priority

from .conftest import held_server, scrape, wait_for, with_parameter


def blocked_pool(lifo_after: float | None, levels: int = 1) -> tuple[ComputePool, threading.Event]:
    """A one-thread pool whose thread waits on the returned event, so that work queues behind it."""
    pool, release = ComputePool(1, lifo_after, levels), threading.Event()
    pool.submit(release.wait, 30)
    wait_for(lambda: pool.queued == 0, 10, "the blocker to start")
    return pool, release


def test_refuse_waiting_fails_the_queued_work_only():
    """At the end of a server's grace period: work still queued gets the error (its callers an answer),
    work cancelled by its caller stays cancelled, the running work finishes, and nothing refused runs."""
    pool, release = blocked_pool(None)
    ran: list[int] = []
    waiting = [pool.submit(ran.append, i) for i in range(3)]
    waiting[1].cancel()
    assert pool.refuse_waiting(RuntimeError("stopping")) == 2
    assert [type(f.exception(5)) for f in (waiting[0], waiting[2])] == [RuntimeError, RuntimeError]
    assert waiting[1].cancelled() and pool.queued == 0
    release.set()
    pool.shutdown()
    assert ran == []


def run_order(pool: ComputePool, release: threading.Event, count: int, wait_before_release: float) -> list[int]:
    order: list[int] = []
    futures = [pool.submit(order.append, i) for i in range(count)]
    time.sleep(wait_before_release)
    release.set()
    for future in futures:
        future.result(timeout=30)
    pool.shutdown()
    return order


def test_work_runs_in_arrival_order_while_the_queue_moves():
    pool, release = blocked_pool(lifo_after=30.0)
    assert run_order(pool, release, 5, 0.0) == [0, 1, 2, 3, 4]
    assert pool.newest_first == 0


def test_once_the_oldest_waited_past_lifo_after_the_newest_runs_first():
    pool, release = blocked_pool(lifo_after=0.05)
    assert run_order(pool, release, 5, 0.2) == [4, 3, 2, 1, 0]  # the oldest still waits long: newest first each time
    assert pool.newest_first == 4  # the last one left is the only one: not counted


def test_without_lifo_after_the_order_is_always_arrival():
    pool, release = blocked_pool(lifo_after=None)
    assert run_order(pool, release, 5, 0.2) == [0, 1, 2, 3, 4]


def test_cancelled_work_never_runs_and_expired_work_does_not_keep_the_queue_standing():
    pool, release = blocked_pool(lifo_after=0.3)
    order: list[int] = []
    old = [pool.submit(order.append, i) for i in (0, 1)]
    time.sleep(0.4)  # they have waited past lifo_after ...
    assert all(future.cancel() for future in old)  # ... and their callers gave up
    fresh = [pool.submit(order.append, i) for i in (2, 3, 4)]
    release.set()
    for future in fresh:
        future.result(timeout=30)
    assert order == [2, 3, 4] and pool.newest_first == 0
    pool.shutdown()


def test_errors_reach_the_caller_and_shutdown_finishes_queued_work_then_refuses_more():
    pool, release = blocked_pool(lifo_after=None)
    failing = pool.submit(int, "not a number")
    done = [pool.submit(lambda i=i: i * i) for i in range(3)]
    release.set()
    pool.shutdown(wait=True)
    with pytest.raises(ValueError, match="invalid literal"):
        failing.result(timeout=0)
    assert [future.result(timeout=0) for future in done] == [0, 1, 4]
    with pytest.raises(RuntimeError, match="cannot schedule new work after shutdown"):
        pool.submit(print)


def test_shutdown_can_cancel_what_waits():
    pool, release = blocked_pool(lifo_after=None)
    waiting = [pool.submit(print, i) for i in range(3)]
    pool.shutdown(wait=False, cancel_futures=True)
    release.set()
    pool.shutdown(wait=True)
    assert all(future.cancelled() for future in waiting)


def test_a_thread_takes_the_first_level_that_has_work_and_the_oldest_of_any_level_first_once_expired():
    pool, release = blocked_pool(lifo_after=None, levels=3)
    order: list[str] = []
    futures = [pool.submit_at(2, time.monotonic() + 0.05, partial(order.append, "low, expired"))]
    futures += [pool.submit_at(level, None, partial(order.append, name))
                for level, name in ((2, "low"), (1, "middle"), (0, "high"), (2, "low again"), (0, "high again"))]
    time.sleep(0.1)
    release.set()
    for future in futures:
        future.result(timeout=30)
    pool.shutdown()
    assert order == ["low, expired", "high", "high again", "middle", "low", "low again"]
    with pytest.raises(ValueError, match="priority level 3 is not one of this pool's 0-2"):
        pool.submit_at(3, None, print)


WORK = st.lists(st.tuples(st.integers(0, 2), st.booleans(), st.booleans(), st.sampled_from([None, "a", "b"])),
                max_size=12)  # (level, expired, cancelled, stream)


def expected_order(work: list[tuple[int, bool, bool, str | None]], newest_first: bool) -> list[int]:
    """The order the pool's rule runs `work` (queued in this order behind a busy thread) in: an
    expired oldest of any level first, else the first level with work, its newest (when the queue
    stands; the oldest of the newest's stream, if it has one) or its oldest; cancelled work is taken
    out at the head, or skipped when taken."""
    levels: list[list[int]] = [[], [], []]
    for index, (level, *_) in enumerate(work):
        levels[level].append(index)
    taken = []
    while any(levels):
        for level in levels:
            while level and work[level[0]][2]:
                level.pop(0)
        expired = next((level for level in levels if level and work[level[0]][1]), None)
        level = expired or next((level for level in levels if level), None)
        if level is None:
            continue
        at = 0
        if newest_first and expired is None and len(level) > 1:
            stream = work[level[-1]][3]
            at = -1 if stream is None else next(i for i, index in enumerate(level) if work[index][3] == stream)
        taken.append(level.pop(at))
    return [i for i in taken if not work[i][2]]


@settings(max_examples=60, deadline=None)
@given(work=WORK, newest_first=st.booleans())
def test_the_pool_runs_every_live_piece_of_work_once_in_the_rules_order(work, newest_first):
    pool, release = blocked_pool(lifo_after=0.0 if newest_first else None, levels=3)
    ran: list[int] = []
    streams = {"a": object(), "b": object()}
    futures = [pool.submit_at(level, time.monotonic() - 1 if expired else None, partial(ran.append, index),
                              streams.get(stream))
               for index, (level, expired, _, stream) in enumerate(work)]
    for future, (_, _, cancelled, _) in zip(futures, work):
        if cancelled:
            future.cancel()
    time.sleep(0.001)  # every piece has waited more than lifo_after=0
    release.set()
    pool.shutdown(wait=True)
    assert ran == expected_order(work, newest_first)
    assert all(f.cancelled() == cancelled for f, (_, _, cancelled, _) in zip(futures, work))
    assert all(f.done() for f in futures)


def test_newest_first_keeps_a_streams_requests_in_their_order():
    """A stream's answers go in request order: newest first, its last request computed first held
    every answer of the stream until the whole window was computed (2 s for its 10th answer)."""
    pool, release = blocked_pool(lifo_after=0.05)
    stream, order = object(), []
    futures = [pool.submit_at(0, None, partial(order.append, f"stream {i}"), stream) for i in range(3)]
    futures.append(pool.submit_at(0, None, partial(order.append, "lone")))
    time.sleep(0.2)
    release.set()
    for future in futures:
        future.result(timeout=30)
    pool.shutdown()
    assert order == ["lone", "stream 0", "stream 1", "stream 2"]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least one thread, got 0"):
        ComputePool(0)
    with pytest.raises(ValueError, match="lifo_after must be 0 or more seconds, or None, got -1"):
        ComputePool(1, -1)
    with pytest.raises(ValueError, match="--lifo-after-ms must be at least 0, got -5"):
        ServerConfig(registry="r", lifo_after_ms=-5)
    with pytest.raises(ValueError, match="at least one priority level, got 0"):
        ComputePool(1, levels=0)
    with pytest.raises(ValueError, match="--priority-levels must be at least 0, got -1"):
        ServerConfig(registry="r", priority_levels=-1)
    with pytest.raises(ValueError, match=r"--default-priority-level must be from 1 to --priority-levels \(2\), got 3"):
        ServerConfig(registry="r", priority_levels=2, default_priority_level=3)
    with pytest.raises(ValueError, match="--default-priority-level needs --priority-levels"):
        ServerConfig(registry="r", default_priority_level=1)


def test_priority_is_read_as_triton_sends_it_and_checked():
    request = partial(with_parameter, "priority")
    assert decode_priority(request()) == 0
    assert decode_priority(request(uint64_param=2)) == 2  # tritonclient's infer(priority=2)
    assert decode_priority(request(int64_param=1)) == 1
    for bad in ({"int64_param": -1}, {"string_param": "high"}, {"double_param": 1.0}, {"bool_param": True}):
        with pytest.raises(InvalidRequest, match=r"parameter 'priority' must be a non-negative integer \(1 is the "
                                                 r"highest level, 0 the server's default\), got"):
            decode_priority(request(**bad))


def test_newest_first_by_default_unless_a_queue_bound_keeps_waits_short_or_it_is_turned_off():
    assert ServerConfig(registry="r").lifo_after == 0.1
    assert ServerConfig(registry="r", max_queue_size=32).lifo_after is None
    assert ServerConfig(registry="r", max_queue_size=32, lifo_after_ms=250).lifo_after == 0.25
    assert ServerConfig(registry="r", lifo_after_ms=0).lifo_after is None


def test_expired_work_at_the_head_goes_first_to_answer_that_it_is_late():
    """Newest-first order would reach the oldest work last; work past its expiry answers at once
    (a request's `timeout`), so it is taken as soon as it is at the head."""
    pool, release = blocked_pool(lifo_after=0.05)
    order: list[int] = []
    futures = [pool.submit_at(0, time.monotonic() + 0.1, lambda: order.append(0))]
    futures += [pool.submit(order.append, i) for i in (1, 2, 3)]
    time.sleep(0.2)
    release.set()
    for future in futures:
        future.result(timeout=30)
    pool.shutdown()
    assert order == [0, 3, 2, 1]


def queue_requests(server: InferenceServer, priorities: dict[str, int], answered: list[str],
                   pause: float = 0.0) -> list[threading.Thread]:
    """One task-inference request per name, with its priority (0: none), from a thread each, one after
    the other once the previous is queued in the compute pool (`pause` seconds apart at least); each
    thread appends its name to `answered` when its answer comes."""
    client, pool = triton.InferenceServerClient(f"127.0.0.1:{server.port}"), server.servicer.compute
    tensor = triton.InferInput("input", [4, 64], "FP32")
    tensor.set_data_from_numpy(np.random.default_rng(0).random((4, 64), dtype=np.float32))
    threads = []
    for count, (name, priority) in enumerate(priorities.items(), 1):
        time.sleep(pause if count > 1 else 0)
        threads.append(threading.Thread(target=lambda n=name, p=priority: (
            client.infer("m", [tensor], priority=p), answered.append(n))))
        threads[-1].start()
        wait_for(lambda c=count: pool.queued == c, 10, f"request {name!r} to queue")
    return threads


def test_a_server_serves_the_newer_request_first_once_the_older_waited_past_lifo_after(tmp_path):
    """Every compute thread held: an older, then (past --lifo-after-ms) a newer task-inference request
    queue. The first thread freed answers the newer first, then the older. The metrics count the choice."""
    with held_server(tmp_path, lifo_after_ms=50) as (server, releases):
        answered: list[str] = []
        threads = queue_requests(server, {"older": 0, "newer": 0}, answered, pause=0.1)
        releases[0].set()  # one thread: it takes the requests one after the other
        for thread in threads:
            thread.join(30)
        assert answered == ["newer", "older"]
        assert scrape(server)[("maskbank_compute_newest_first_total", ())] == 1
        assert scrape(server)[("maskbank_compute_queue_requests", ())] == 0


def test_a_server_with_priority_levels_serves_the_higher_priority_first_and_reports_its_levels(tmp_path):
    """With --priority-levels 2 (requests without a priority at level 2, the lowest), every compute
    thread held: a request without priority and one beyond the levels (both at the default level) queue
    before one of priority 1; the first thread freed answers the priority-1 request first. ModelConfig
    reports the levels as Triton's dynamic_batching does."""
    with held_server(tmp_path, priority_levels=2, lifo_after_ms=0) as (server, releases):
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        batching = client.get_model_config("m", as_json=True)["config"]["dynamic_batching"]
        assert (batching["priority_levels"], batching["default_priority_level"]) == ("2", "2")  # uint64 as JSON strings
        answered: list[str] = []
        threads = queue_requests(server, {"default": 0, "beyond the levels": 7, "first": 1}, answered)
        releases[0].set()
        for thread in threads:
            thread.join(30)
        assert answered == ["first", "default", "beyond the levels"]
