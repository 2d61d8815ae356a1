"""The compute pool's order (arrival order while its queue moves, newest first once it stands), its
cancellation and shutdown, in-process; then a real server on loopback whose pool serves a newer
request before an older one once the older has waited past --lifo-after-ms."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as triton

from serving import InferenceServer, ServerConfig
from serving.compute_pool import ComputePool

from .conftest import TINY, scrape, train_model, wait_for


def blocked_pool(lifo_after: float | None) -> tuple[ComputePool, threading.Event]:
    """A one-thread pool whose thread waits on the returned event, so that work queues behind it."""
    pool, release = ComputePool(1, lifo_after), threading.Event()
    pool.submit(release.wait, 30)
    wait_for(lambda: pool.queued == 0, 10, "the blocker to start")
    return pool, release


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


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="at least one thread, got 0"):
        ComputePool(0)
    with pytest.raises(ValueError, match="lifo_after must be 0 or more seconds, or None, got -1"):
        ComputePool(1, -1)
    with pytest.raises(ValueError, match="--lifo-after-ms must be at least 0, got -5"):
        ServerConfig(registry="r", lifo_after_ms=-5)


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
    futures = [pool.submit_until(time.monotonic() + 0.1, order.append, 0)]
    futures += [pool.submit(order.append, i) for i in (1, 2, 3)]
    time.sleep(0.2)
    release.set()
    for future in futures:
        future.result(timeout=30)
    pool.shutdown()
    assert order == [0, 3, 2, 1]


def test_a_server_serves_the_newer_request_first_once_the_older_waited_past_lifo_after(tmp_path):
    """Every compute thread but one is held, and that one too for a while: an older, then a newer
    task-inference request queue. Once the older has waited past --lifo-after-ms, the thread freed
    answers the newer first, then the older. The metrics count the choice."""
    train_model(tmp_path, "m", 2, TINY)
    server = InferenceServer(ServerConfig(registry=str(tmp_path), port=0, metrics_port=0, lifo_after_ms=50))
    server.start()
    pool = server.servicer.compute
    releases = [threading.Event() for _ in range(pool.workers)]
    blockers = [pool.submit(release.wait, 30) for release in releases]
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
        x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
        tensor = triton.InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        wait_for(lambda: pool.queued == 0, 10, "the blockers to start")
        answered: list[str] = []

        def send(name: str) -> threading.Thread:
            thread = threading.Thread(target=lambda: (client.infer("m", [tensor]), answered.append(name)))
            thread.start()
            return thread

        older = send("older")
        wait_for(lambda: pool.queued == 1, 10, "the older request to queue")
        time.sleep(0.1)  # past --lifo-after-ms
        newer = send("newer")
        wait_for(lambda: pool.queued == 2, 10, "the newer request to queue")
        releases[0].set()  # one thread: it takes the requests one after the other
        for thread in (newer, older):
            thread.join(30)
        assert answered == ["newer", "older"]
        assert scrape(server)[("maskbank_compute_newest_first_total", ())] == 1
        assert scrape(server)[("maskbank_compute_queue_requests", ())] == 0
    finally:
        for release in releases:
            release.set()
        for blocker in blockers:
            blocker.result(timeout=30)
        server.stop()
