"""The dynamic batcher merges concurrent requests of one key and hands each its own rows."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from serving.batcher import DynamicBatcher, Expected, LoopBatcher
from serving.statistics import Statistics, Timing

from .conftest import AtOnce


def run_concurrently(batcher: DynamicBatcher, inputs: list[torch.Tensor], compute, key="k",
                     timings: list[Timing] | None = None) -> list:
    """Each input through `batcher.run` on its own thread, all released at once by a barrier (a busy
    machine may start threads milliseconds apart, longer than a test's queue delay); `timings`, where
    given, receive each request's queue and compute time."""
    results = [None] * len(inputs)
    start = threading.Barrier(len(inputs))

    def call(i):
        start.wait(10)
        try:
            results[i] = batcher.run("m", key, inputs[i], compute, timing=timings[i] if timings else None)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            results[i] = error

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    return results


def test_concurrent_requests_are_merged_and_split_back():
    calls = []

    def compute(x):
        calls.append(len(x))
        time.sleep(0.01)
        return x * 2

    statistics = Statistics()
    batcher = DynamicBatcher(statistics, max_batch_size=64, max_queue_delay_us=50_000)
    inputs = [torch.full((i + 1, 3), float(i)) for i in range(8)]
    timings = [Timing() for _ in inputs]
    results = run_concurrently(batcher, inputs, compute, timings=timings)
    for x, y in zip(inputs, results):
        assert torch.equal(y, x * 2)  # each request gets exactly its own rows back
    assert sum(calls) == sum(len(x) for x in inputs) and len(calls) < len(inputs)
    stats = statistics.snapshot()["m"]
    assert stats.execution_count == len(calls) and sum(d.count for d in stats.batches.values()) == len(calls)
    # each request's timing: the whole execution it was part of (10 ms of sleep at least), and a wait
    assert all(t.compute_ns >= 10_000_000 for t in timings) and max(t.queue_ns for t in timings) > 0
    assert stats.queue.count == stats.compute.count == 0  # counted when the requests succeed, by their caller


def test_batches_never_exceed_the_maximum():
    calls = []
    batcher = DynamicBatcher(Statistics(), max_batch_size=5, max_queue_delay_us=20_000)
    results = run_concurrently(batcher, [torch.ones(2, 1)] * 10, lambda x: calls.append(len(x)) or x)
    assert all(torch.equal(r, torch.ones(2, 1)) for r in results)
    assert max(calls) <= 5 and sum(calls) == 20


def test_an_error_reaches_every_request_of_the_batch_and_the_batcher_recovers():
    batcher = DynamicBatcher(Statistics(), max_batch_size=64, max_queue_delay_us=20_000)

    def broken(x):
        raise ValueError("boom")

    results = run_concurrently(batcher, [torch.ones(1, 1)] * 4, broken)
    assert all(isinstance(r, ValueError) for r in results)
    assert torch.equal(batcher.run("m", "k", torch.ones(1, 1), lambda x: x + 1), torch.full((1, 1), 2.0))


def test_different_keys_are_never_mixed():
    batcher = DynamicBatcher(Statistics(), max_batch_size=64, max_queue_delay_us=20_000)
    out = {}

    def call(key):
        out[key] = batcher.run("m", key, torch.full((1, 1), float(key)), lambda x: x * 10)

    threads = [threading.Thread(target=call, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert {k: float(v) for k, v in out.items()} == {k: 10.0 * k for k in range(6)}


@pytest.mark.parametrize("delay_us", [0, 1000])
def test_many_rounds_complete(delay_us):
    batcher = DynamicBatcher(Statistics(), max_batch_size=7, max_queue_delay_us=delay_us)
    for _ in range(20):
        inputs = [torch.randn(3, 2) for _ in range(6)]
        results = run_concurrently(batcher, inputs, lambda x: x + 1)
        assert all(torch.equal(r, x + 1) for r, x in zip(results, inputs))


def test_concurrent_requests_for_different_tasks_get_their_own_logits(tmp_path):
    """Regression: threads sharing one module under functional_call overwrote each other's weights."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from registry import Registry
    from serving import ModelRepository, infer

    from .conftest import TINY, train_model

    train_model(tmp_path, "m", 2, TINY)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    x = np.random.default_rng(0).random((8, 64), dtype=np.float32)
    expected = {t: infer(repository.get("m"), x, task=t).logits for t in (0, 1)}
    assert not np.array_equal(expected[0], expected[1])
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: (i % 2, infer(repository.get("m"), x, task=i % 2).logits), range(400)))
    wrong = sum(not np.array_equal(logits, expected[task]) for task, logits in answers)
    assert wrong == 0


@pytest.mark.parametrize("instances", [1, 2])
def test_instances_bound_how_many_batches_of_one_key_run_at_once(instances):
    running = AtOnce()

    def compute(x):
        with running:
            time.sleep(0.02)
        return x

    batcher = DynamicBatcher(Statistics(), max_batch_size=1, instances=instances)  # batches of one request
    inputs = [torch.full((1, 1), float(i)) for i in range(6)]
    results = run_concurrently(batcher, inputs, compute)
    assert all(torch.equal(r, x) for r, x in zip(results, inputs))
    assert running.most == instances


# --- LoopBatcher: the same batching on an asyncio event loop (the aio front end's inline path) -------------------

def run_on_loop(batcher: LoopBatcher, inputs: list[torch.Tensor], compute, key="k") -> list:
    """Each input through `batcher.run` as its own task on one event loop, all started together."""

    async def one(x):
        try:
            return await batcher.run("m", key, x, compute)
        except Exception as error:  # noqa: BLE001 - the test inspects it
            return error

    async def all_of_them():
        return await asyncio.gather(*(one(x) for x in inputs))

    return asyncio.run(all_of_them())


def test_the_loop_batcher_merges_requests_that_arrive_within_the_delay():
    calls = []
    statistics = Statistics()
    batcher = LoopBatcher(statistics, max_batch_size=64, max_queue_delay_us=50_000)
    inputs = [torch.full((i + 1, 3), float(i)) for i in range(6)]
    results = run_on_loop(batcher, inputs, lambda x: calls.append(len(x)) or x * 2)
    assert all(torch.equal(y, x * 2) for x, y in zip(inputs, results))  # each its own rows back
    assert calls == [sum(len(x) for x in inputs)]  # one execution for all of them
    stats = statistics.snapshot()["m"]
    assert stats.execution_count == 1 and stats.batches[sum(len(x) for x in inputs)].count == 1


def test_the_loop_batcher_splits_at_the_maximum_and_runs_at_once_without_a_delay():
    calls = []
    results = run_on_loop(LoopBatcher(Statistics(), max_batch_size=5, max_queue_delay_us=20_000),
                          [torch.ones(2, 1)] * 6, lambda x: calls.append(len(x)) or x)
    assert all(torch.equal(r, torch.ones(2, 1)) for r in results)
    assert max(calls) <= 5 and sum(calls) == 12
    calls.clear()
    run_on_loop(LoopBatcher(Statistics(), max_batch_size=64), [torch.ones(1, 1)] * 4, lambda x: calls.append(len(x)) or x)
    assert calls == [1, 1, 1, 1]  # no delay: nothing waits for company


def test_the_loop_batcher_gives_an_error_to_every_request_of_the_batch_and_recovers():
    batcher = LoopBatcher(Statistics(), max_batch_size=64, max_queue_delay_us=20_000)

    def broken(x):
        raise ValueError("boom")

    assert all(isinstance(r, ValueError) for r in run_on_loop(batcher, [torch.ones(1, 1)] * 3, broken))
    assert torch.equal(run_on_loop(batcher, [torch.ones(1, 1)], lambda x: x + 1)[0], torch.full((1, 1), 2.0))


def test_a_cancelled_leader_still_runs_the_batch_for_the_requests_that_joined():
    batcher = LoopBatcher(Statistics(), max_batch_size=64, max_queue_delay_us=200_000)

    async def scenario():
        leader = asyncio.create_task(batcher.run("m", "k", torch.ones(1, 1), lambda x: x * 3))
        await asyncio.sleep(0.01)  # the leader is waiting out the delay
        joined = asyncio.create_task(batcher.run("m", "k", torch.full((1, 1), 2.0), lambda x: x * 3))
        await asyncio.sleep(0.01)
        leader.cancel()
        return await asyncio.wait_for(joined, 5)

    assert torch.equal(asyncio.run(scenario()), torch.full((1, 1), 6.0))


def test_the_loop_batcher_keeps_each_forward_within_the_callers_row_bound_and_lets_the_loop_run_between():
    log = []
    batcher = LoopBatcher(Statistics(), max_batch_size=64, max_queue_delay_us=50_000)

    def compute(x):
        log.append(len(x))
        return x + 1

    async def ticker(stop: asyncio.Event):
        while not stop.is_set():
            log.append("tick")
            await asyncio.sleep(0)

    async def scenario():
        stop = asyncio.Event()
        ticks = asyncio.create_task(ticker(stop))
        inputs = [torch.full((2, 1), float(i)) for i in range(5)]
        results = await asyncio.gather(*(batcher.run("m", "k", x, compute, max_rows=4) for x in inputs))
        stop.set()
        await ticks
        return inputs, results

    inputs, results = asyncio.run(scenario())
    assert all(torch.equal(y, x + 1) for x, y in zip(inputs, results))
    batches = [entry for entry in log if entry != "tick"]
    assert batches == [4, 4, 2]  # 10 rows in forwards of at most 4
    first, last = log.index(4), len(log) - 1 - log[::-1].index(2)
    between = log[first:last]
    assert between.count("tick") >= 2  # the loop ran other work between the batches


def test_a_request_that_gave_up_does_not_stop_the_others_of_its_batch():
    batcher = LoopBatcher(Statistics(), max_batch_size=64, max_queue_delay_us=100_000)

    async def scenario():
        leader = asyncio.create_task(batcher.run("m", "k", torch.ones(1, 1), lambda x: x * 3))
        await asyncio.sleep(0.01)
        quitter = asyncio.create_task(batcher.run("m", "k", torch.full((1, 1), 2.0), lambda x: x * 3))
        stayer = asyncio.create_task(batcher.run("m", "k", torch.full((1, 1), 4.0), lambda x: x * 3))
        await asyncio.sleep(0.01)
        quitter.cancel()
        return await asyncio.wait_for(asyncio.gather(leader, stayer), 5)

    leader, stayer = asyncio.run(scenario())
    assert torch.equal(leader, torch.full((1, 1), 3.0)) and torch.equal(stayer, torch.full((1, 1), 12.0))


# --- Expected: a batch stops waiting once it holds as many requests as its key's batches gather ----------------

def test_expected_learns_from_batches_that_waited_out_grows_and_forgets_lone_requests():
    expected = Expected(keys=2)
    assert not expected.reached("a", 100)  # nothing learnt: wait the delay
    expected.record("a", 4, waited_out=True)
    assert expected.reached("a", 4) and not expected.reached("a", 3)
    expected.record("a", 6, waited_out=False)  # more joined before the leader woke: raise
    assert not expected.reached("a", 5) and expected.reached("a", 6)
    expected.record("a", 3, waited_out=False)  # ended early at a smaller count: keeps what it knows
    assert not expected.reached("a", 5)
    expected.record("a", 3, waited_out=True)  # a client left: the whole delay brought only 3
    assert expected.reached("a", 3)
    expected.record("a", 1, waited_out=True)  # a lone request cannot tell: the next one waits again
    assert not expected.reached("a", 1) and not expected.reached("a", 100)
    for key in "bcd":
        expected.record(key, 2, waited_out=True)
    assert not expected.reached("b", 2) and expected.reached("d", 2)  # only the 2 most recent keys kept


def test_a_thread_batch_that_has_what_its_key_gathers_runs_without_waiting_out_the_delay():
    """Two requests fill the 4-row maximum (a batch of 2 requests); then two requests of one row each
    run as one batch at once, not after the 60 s delay (run_concurrently gives up after 10 s)."""
    calls = []
    batcher = DynamicBatcher(Statistics(), max_batch_size=4, max_queue_delay_us=60_000_000, instances=2)
    run_concurrently(batcher, [torch.ones(2, 1)] * 2, lambda x: calls.append(len(x)) or x)
    results = run_concurrently(batcher, [torch.ones(1, 1)] * 2, lambda x: calls.append(len(x)) or x)
    assert all(torch.equal(r, torch.ones(1, 1)) for r in results)
    assert calls == [4, 2]  # the second request joined the gathering batch rather than lead a second instance


def test_a_loop_batch_that_has_what_its_key_gathers_runs_without_waiting_out_the_delay():
    calls = []
    batcher = LoopBatcher(Statistics(), max_batch_size=4, max_queue_delay_us=60_000_000)

    async def rounds():
        compute = lambda x: calls.append(len(x)) or x  # noqa: E731
        await asyncio.gather(*(batcher.run("m", "k", torch.ones(2, 1), compute) for _ in range(2)))
        return await asyncio.wait_for(asyncio.gather(*(batcher.run("m", "k", torch.ones(1, 1), compute)
                                                       for _ in range(2))), 10)

    results = asyncio.run(rounds())
    assert all(torch.equal(r, torch.ones(1, 1)) for r in results) and calls == [4, 2]
