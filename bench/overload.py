"""Overload benchmark: what the compute pool's adaptive LIFO and priority levels, --max-queue-size and
--default-timeout-us do when more requests arrive than a server can compute.

Five `maskbank serve` processes of one registry (and a sixth, below): one with no rule whose compute pool keeps arrival
order (--lifo-after-ms 0, the reference), one with the defaults (no rule; the pool takes the newest
request first once its queue stands: adaptive LIFO), one with --max-queue-size BOUND (a request beyond
it is refused at once), one with --default-timeout-us TIMEOUT_US (a request that waited longer for
the compute pool is not computed) and one with --priority-levels PRIORITY_LEVELS. They are offered
OVERLOAD times the capacity measured first (closed-loop clients, bench.loadgen) by an open-loop load
generator in its own process: requests go out on a fixed schedule whatever the answers, as
independent callers send them, every PRIORITY_EVERY-th with Triton's `priority` 1 (which only the
server with levels reads), first without a client deadline, then with each request under a deadline
of 1 s (DEADLINES). Phases of SECONDS alternate between the servers for REPEATS rounds. Per phase:
requests served per second from the first request sent to the last answer (goodput); the shares
refused (UNAVAILABLE), dropped by the server (DEADLINE_EXCEEDED before the deadline) and timed out at
the client; the latency of the served requests (p50, p99, max); and the share served and latency of
the priority-1 requests alone; with ratios of each server over the reference per round, quoted as
median (min-max). In arrival order without a rule every request is taken and each waits longer than
the last; with either rule, the requests the server serves keep a bounded wait.

Then small requests, SMALL_BATCH rows each, which the server computes on its event loop, where none
of those rules reach: twice the default server's capacity for them, with 1 s deadlines, to it and to
a sixth server with --max-concurrent-streams STREAMS (the generator's one connection may have that
many calls in the server at once).

The model is the serving benchmark's (SupSup, MLP 64-512-512-10, one task); requests are task-given,
BATCH rows each (so they run on the compute pool, not inline on the event loop), or SMALL_BATCH. Every
process runs one torch thread. Run: python -m bench overload (about 8 min; writes
bench/results/overload.json).
The generator alone: python -m bench.overload --generate '<spec json>' (prints its answer as JSON).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from maskbank.process import ServerProcess

from ._command import run_benchmark

THREADS = 1
BATCH = 256
BOUND = 32
TIMEOUT_US = 200_000
PRIORITY_LEVELS, PRIORITY_EVERY = 2, 10  # every 10th request is sent with priority 1 (all servers; only one has levels)
SMALL_BATCH, STREAMS = 48, 32  # small requests: computed on the event loop (48 x 300K weights < 2^24 multiply-adds)
OVERLOAD = 2.0  # offered rate / measured capacity
SECONDS = 4.0  # offered load per phase
REPEATS = 5
# how long a client waits for its answer: long enough never to give up, then as a caller with a deadline
# would (a request past it is answered DEADLINE_EXCEEDED, and the server drops it if it has not started)
DEADLINES = {"no client deadline": 30.0, "client deadline 1 s": 1.0}
RESULTS = Path(__file__).parent / "results" / "overload.json"
MODEL = "bench"


def generate(spec: dict) -> dict:
    """Send `rate` requests per second for `seconds` (open loop, each with a `deadline`), wait for
    every answer, and count them: served (with latencies), refused (UNAVAILABLE), failed otherwise."""
    import grpc
    import numpy as np
    from tritonclient.grpc import service_pb2 as pb

    if spec["url"].rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the load generator only talks to loopback addresses, not {spec['url']!r}")
    x = np.random.default_rng(0).random((spec["batch"], 64), dtype=np.float32)
    request = pb.ModelInferRequest(model_name=MODEL, raw_input_contents=[x.tobytes()])
    request.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    request.parameters["task_id"].int64_param = 0
    raw = request.SerializeToString()
    request.parameters["priority"].uint64_param = 1  # as tritonclient's infer(priority=1) sends it
    urgent = request.SerializeToString()
    channel = grpc.insecure_channel(spec["url"], options=[("grpc.max_receive_message_length", 64 << 20)])
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    answers: list[tuple[str, float, bool]] = []  # (status, latency, sent with priority 1)
    lock, done = threading.Lock(), threading.Semaphore(0)

    def record(future, sent: float, first: bool) -> None:
        code = future.code()
        with lock:
            answers.append((code.name if code is not None else "CANCELLED", time.monotonic() - sent, first))
        done.release()

    count = int(spec["rate"] * spec["seconds"])
    began = time.monotonic()
    for i in range(count):
        if (wait := began + i / spec["rate"] - time.monotonic()) > 0:
            time.sleep(wait)
        sent, first = time.monotonic(), bool(spec["priority_every"]) and i % spec["priority_every"] == 0
        infer.future(urgent if first else raw, timeout=spec["deadline"]).add_done_callback(
            lambda f, sent=sent, first=first: record(f, sent, first))
    sending = time.monotonic() - began
    for _ in range(count):
        done.acquire(timeout=spec["deadline"] + 10)
    span = time.monotonic() - began  # from the first request sent to the last answer
    channel.close()
    served = [(latency, first) for code, latency, first in answers if code == "OK"]
    return {"sent": count, "sent_per_s": count / sending, "served": len(served),
            "refused": sum(code == "UNAVAILABLE" for code, _, _ in answers),
            "timed_out": sum(code == "DEADLINE_EXCEEDED" and latency >= spec["deadline"] for code, latency, _ in answers),
            "dropped": sum(code == "DEADLINE_EXCEEDED" and latency < spec["deadline"] for code, latency, _ in answers),
            "failed": sum(code not in ("OK", "UNAVAILABLE", "DEADLINE_EXCEEDED") for code, _, _ in answers),
            "goodput": len(served) / span, "span_s": span,
            "latency_ms": percentiles([latency for latency, _ in served]),
            "priority": {"sent": sum(first for _, _, first in answers), "served": sum(first for _, first in served),
                         "latency_ms": percentiles([latency for latency, first in served if first])}}


def percentiles(latencies: list[float]) -> dict[str, float | None]:
    """p50, p99 and max of `latencies` (seconds) in milliseconds (None without any)."""
    ordered = sorted(latencies)
    pct = lambda q: 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None  # noqa: E731
    return {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)}


def run_generator(spec: dict) -> dict:
    """`generate(spec)` in a process of its own (bounded in time), its answer parsed."""
    result = subprocess.run([sys.executable, "-m", "bench.overload", "--generate", json.dumps(spec)],
                            capture_output=True, text=True, timeout=spec["seconds"] + spec["deadline"] + 60,
                            cwd=Path(__file__).parent.parent)
    if result.returncode:
        raise RuntimeError(f"the load generator failed:\n{result.stderr}")
    return json.loads(result.stdout)


def capacity(url: str, batch: int = BATCH) -> float:
    """Requests per second the server computes under closed-loop load (4 clients, `batch` rows)."""
    from .loadgen import LoadProcess

    with LoadProcess(lifetime=120) as load:
        return load.run({"url": url, "model": MODEL, "clients": 4, "batch": batch, "seconds": 3.0})["rps"]


def alternate(servers: dict[str, ServerProcess], spec: dict) -> dict[str, list[dict]]:
    """REPEATS rounds of one generator phase per server, in turn: each server's runs."""
    phases: dict[str, list[dict]] = {name: [] for name in servers}
    for _ in range(REPEATS):
        for name, server in servers.items():
            phases[name].append(run_generator({"url": server.url, **spec}))
    return phases


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}x ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    from .serving import train_base

    with tempfile.TemporaryDirectory() as root:
        train_base(Path(root))
        common = ("--threads", str(THREADS), "--metrics-port", "-1")
        with (ServerProcess(root, *common, "--lifo-after-ms", "0") as arrival_order,
              ServerProcess(root, *common) as default,
              ServerProcess(root, *common, "--max-queue-size", str(BOUND)) as bounded,
              ServerProcess(root, *common, "--default-timeout-us", str(TIMEOUT_US)) as timed,
              ServerProcess(root, *common, "--priority-levels", str(PRIORITY_LEVELS)) as levels,
              ServerProcess(root, *common, "--max-concurrent-streams", str(STREAMS)) as streams):
            servers = {"no rule, arrival order (--lifo-after-ms 0)": arrival_order,
                       "no rule, adaptive LIFO (the default)": default, f"--max-queue-size {BOUND}": bounded,
                       f"--default-timeout-us {TIMEOUT_US}": timed, f"--priority-levels {PRIORITY_LEVELS}": levels}
            measured = capacity(arrival_order.url)
            rate = OVERLOAD * measured
            print(f"capacity {measured:.0f} requests/s (batch {BATCH}, 4 closed-loop clients); offering "
                  f"{rate:.0f}/s for {SECONDS:.0f} s per phase, {REPEATS} rounds\n", flush=True)
            scenarios = {scenario: alternate(servers, {"batch": BATCH, "rate": rate, "seconds": SECONDS,
                                                       "deadline": deadline, "priority_every": PRIORITY_EVERY})
                         for scenario, deadline in DEADLINES.items()}
            small_capacity = capacity(default.url, SMALL_BATCH)
            print(f"small requests: capacity {small_capacity:.0f} requests/s (batch {SMALL_BATCH}, computed on the "
                  f"event loop); offering {OVERLOAD * small_capacity:.0f}/s with 1 s deadlines\n", flush=True)
            scenarios[f"small requests (batch {SMALL_BATCH}), client deadline 1 s"] = alternate(
                {"no rule (the default)": default, f"--max-concurrent-streams {STREAMS}": streams},
                {"batch": SMALL_BATCH, "rate": OVERLOAD * small_capacity, "seconds": SECONDS, "deadline": 1.0,
                 "priority_every": 0})
    results = {"benchmark": "overload", "threads": THREADS, "batch": BATCH, "bound": BOUND, "timeout_us": TIMEOUT_US,
               "capacity_rps": measured, "priority_levels": PRIORITY_LEVELS, "priority_every": PRIORITY_EVERY,
               "small_batch": SMALL_BATCH, "small_capacity_rps": small_capacity, "streams": STREAMS,
               "offered_rps": rate, "seconds": SECONDS, "repeats": REPEATS, "deadlines_s": DEADLINES,
               "scenarios": scenarios}
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))  # before the report: a run's figures outlive a bug in it
    print(report(results))
    print(f"\nwrote {RESULTS}")


def report(results: dict) -> str:
    """The Markdown table of a run: per scenario and server, medians over the rounds; then per scenario
    the per-round ratios of each other server over the first (the reference)."""
    lines = ["| scenario | server | served/s | refused | dropped | timed out | failed otherwise | p50 ms | p99 ms "
             "| max ms | priority 1: served | priority 1: p50 ms | priority 1: p99 ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, phases in results["scenarios"].items():
        for name, runs in phases.items():
            lines.append(f"| {scenario} | {name} | " + row(runs))
    for scenario, phases in results["scenarios"].items():
        (reference, free), *ruled = phases.items()
        for name, runs in ruled:
            ratio = lambda read: summary([read(b) / read(f) for f, b in zip(free, runs)])  # noqa: E731
            lines.append(f"\n{scenario}, {name} / {reference} per round: served/s {ratio(lambda r: r['goodput'])}, "
                         f"p50 latency {ratio(lambda r: r['latency_ms']['p50'])}, "
                         f"p99 latency {ratio(lambda r: r['latency_ms']['p99'])}")
    return "\n".join(lines)


def row(runs: list[dict]) -> str:
    """One server's cells: medians over its phases (failures summed)."""
    median = lambda read: statistics.median(read(r) for r in runs)  # noqa: E731
    return (f"{median(lambda r: r['goodput']):.0f} | {median(lambda r: r['refused'] / r['sent']):.0%} | "
            f"{median(lambda r: r['dropped'] / r['sent']):.0%} | {median(lambda r: r['timed_out'] / r['sent']):.0%} | "
            f"{sum(r['failed'] for r in runs)} | "
            f"{median(lambda r: r['latency_ms']['p50']):.0f} | {median(lambda r: r['latency_ms']['p99']):.0f} | "
            f"{median(lambda r: r['latency_ms']['max']):.0f} | " + priority_cells(runs))


def priority_cells(runs: list[dict]) -> str:
    """The priority-1 requests' share served, p50 and p99 (medians over the phases); dashes where none were sent."""
    if not all(r["priority"]["sent"] for r in runs):
        return "- | - | - |"
    median = lambda read: statistics.median(read(r) for r in runs)  # noqa: E731
    return (f"{median(lambda r: r['priority']['served'] / r['priority']['sent']):.0%} | "
            f"{median(lambda r: r['priority']['latency_ms']['p50'] or float('nan')):.0f} | "
            f"{median(lambda r: r['priority']['latency_ms']['p99'] or float('nan')):.0f} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--generate"]:
        print(json.dumps(generate(json.loads(sys.argv[2]))))
    else:
        run_benchmark(main, __doc__)
