"""Serving benchmark: the serve_overhead, small_requests, task_mix and hot_add rows of the README's serving table (and their targets).

Every server is a real child process on a free loopback port (`maskbank serve` through
maskbank.process.ServerProcess, the protocol floor through bench.oip_floor.FloorProcess); the load
comes from ONE separate load-generator process (bench.loadgen.LoadProcess: threads, each with its
own gRPC channel, sending pre-serialised ModelInferRequests and parsing every answer), every phase
bounded in time and in count. Phases alternate A B (C) A B (C) ... for REPEATS rounds after a warm-up
phase per server; each ratio is computed per round and quoted as median (min-max).

serve_overhead and small_requests also run the same `maskbank serve` on gRPC's default poller
(GRPC_EXPERIMENTS empty; `maskbank serve` turns one experiment off, see maskbank/__main__.py) and
read, per phase, the CPU the server and the load generator spent per request (from /proc). The
synchronous floor runs on gRPC's defaults, the aio floors on maskbank serve's setting: each its faster.

The model: SupSup on permuted digits, MLP SIZES (the benchmark network), one task trained for one
epoch (its accuracy is irrelevant here). task_mix and hot_add add *synthetic* SupSup tasks: random
supermasks at density 0.5, stored as bitmask/v1 blobs and published through Registry.publish, because
training 1,000 tasks with trainer.train takes far longer than this benchmark's budget (the trainer
evaluates every earlier task and records the T x T accuracy matrix in each generation: about 0.35 s
per task at T = 200 even for MLP [64, 64, 10], growing with T). Serving cost does not depend on what
the masks learned. Every process runs torch.set_num_threads(THREADS) (servers via --threads; the
load generator does not import torch).

Run: python -m bench serving (everything; writes bench/results/serving.json), or
python -m bench.serving --only task_mix [hot_add ...] (those sections; writes
bench/results/serving-<sections>.json). Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

from maskbank.__main__ import SERVE_GRPC_EXPERIMENTS
from maskbank.process import ServerProcess
from registry import Registry, TaskEntry, build_architecture, effective_parameters, forward
from trainer import train

from .loadgen import LoadProcess
from .oip_floor import FloorProcess, dense_mlp

THREADS = 1
SIZES = [64, 512, 512, 10]
MODEL = "bench"
REPEATS = 7
PHASE_SECONDS = 3.0
WARMUP_SECONDS = 0.3  # at the start of every phase, not counted
MAX_REQUESTS = 100_000  # per phase
BATCH, CLIENTS = 32, 4  # serve_overhead and task_mix
SMALL_CLIENTS, QUEUE_DELAY_US = 8, 2000  # small_requests
MIX_TASKS = (100, 1000)
MIX_WARMUP_SECONDS = 8.0  # per task_mix server: about 10,000 random requests, which ask for all of 1,000 tasks
FORMER_CACHE_BYTES = 256 << 20  # --cache-bytes' default before it became a share of memory
HOT_ADDS, HOT_SPACING, POLL_INTERVAL = 20, 1.0, 0.2
DENSITY = 0.5
CHECK_SECONDS = 2.0  # the untimed correctness phase of task_mix
RESULTS = Path(__file__).parent / "results" / "serving.json"
SECTIONS = ("serve_overhead", "small_requests", "task_mix", "hot_add")


# ---------------------------------------------------------------- registries

def train_base(root: Path) -> Registry:
    registry = Registry(root)
    settings = {"method": "supsup", "stream": "permuted-digits", "architecture": {"arch": "mlp", "sizes": SIZES},
                "method_config": {"epochs": 1}}
    train(registry, MODEL, 1, settings, log=lambda _: None)
    return registry


def synthetic_entry(registry: Registry, manifest, task_id: int, generator: torch.Generator) -> TaskEntry:
    """A SupSup task with a random supermask at DENSITY, its blob already stored; its other parts
    (BatchNorm statistics, if the network has any) are task 0's."""
    first = manifest.tasks[0]
    shapes = _backbone_shapes(registry, manifest)
    masks = {name: torch.rand(shape, generator=generator) < DENSITY for name, shape in shapes.items()}
    ref = registry.put("bitmask/v1", masks)
    return TaskEntry(id=task_id, name=f"synthetic-{task_id}", method="supsup", backbone=first.backbone,
                     num_classes=first.num_classes, parts={**first.parts, "masks": ref})


_SHAPES: dict[tuple, dict[str, tuple]] = {}  # per (registry, model): the backbone's weight shapes


def _backbone_shapes(registry: Registry, manifest) -> dict[str, tuple]:
    key = (str(registry.location), manifest.model)
    if key not in _SHAPES:
        backbone = registry.load_backbone(manifest, manifest.tasks[0].backbone)
        _SHAPES[key] = {name: tuple(w.shape) for name, w in backbone.items()}
    return _SHAPES[key]


def reference_logits(registry: Registry, entries, batch: int) -> dict[int, list]:
    """In-process logits of `entries` (TaskEntry, blobs stored) for the input bench.loadgen sends
    (default_rng(0).random((batch, features))): what a correct server answers."""
    manifest = registry.manifest(MODEL)
    x = torch.from_numpy(np.random.default_rng(0).random((batch, SIZES[0]), dtype=np.float32))
    module = build_architecture(manifest.architecture)
    backbones: dict = {}
    out = {}
    for entry in entries:
        if entry.backbone not in backbones:
            backbones[entry.backbone] = registry.load_backbone(manifest, entry.backbone)
        parts = {name: registry.load(ref) for name, ref in entry.parts.items()}
        with torch.no_grad():
            params = effective_parameters(entry.method, backbones[entry.backbone], parts)
            out[entry.id] = forward(module, params, x)[:, : entry.num_classes].tolist()
    return out


def add_synthetic_tasks(registry: Registry, total: int, seed: int) -> None:
    """Append synthetic tasks until MODEL has `total`, as one new generation."""
    manifest = registry.manifest(MODEL)
    generator = torch.Generator().manual_seed(seed)
    entries = [synthetic_entry(registry, manifest, i, generator) for i in range(len(manifest.tasks), total)]
    registry.publish(MODEL, lambda m: m.next(tasks=(*m.tasks, *entries)))


# ---------------------------------------------------------------- measuring

def spec(url: str, **overrides) -> dict:
    base = {"url": url, "model": MODEL, "clients": CLIENTS, "batch": BATCH, "features": SIZES[0], "classes": SIZES[-1],
            "seconds": PHASE_SECONDS, "warmup_seconds": WARMUP_SECONDS, "max_requests": MAX_REQUESTS, "client": "raw",
            "tasks": [0]}
    return {**base, **overrides}


def compute_floor_rps(batch: int, seconds: float = 0.5, max_iterations: int = 200_000) -> float:
    """Forwards per second of the dense network in this process (the compute floor), bounded."""
    net = dense_mlp(SIZES)
    x = torch.rand(batch, SIZES[0])
    with torch.no_grad():
        for _ in range(20):
            net(x)
        count, began = 0, time.perf_counter()
        while count < max_iterations and time.perf_counter() - began < seconds:
            net(x)
            count += 1
    return count / (time.perf_counter() - began)


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def alternate(load: LoadProcess, phases: dict[str, dict], extra: dict | None = None,
              warmup_seconds: float = 1.0) -> dict[str, list[dict]]:
    """Warm every target up once (`warmup_seconds` each), then REPEATS rounds of the phases in order
    (A B C A B C ...). `extra` maps a name to a callable measured in-process in the same rounds."""
    for phase in phases.values():
        load.run({**phase, "seconds": warmup_seconds})
    runs: dict[str, list] = {name: [] for name in [*phases, *(extra or {})]}
    for _ in range(REPEATS):
        for name, phase in phases.items():
            runs[name].append(load.run(phase))
        for name, fn in (extra or {}).items():
            runs[name].append({"rps": fn(), "failures": 0, "requests": None})
    return runs


def ratios(runs: dict, a: str, b: str) -> dict:
    return summary([x["rps"] / y["rps"] for x, y in zip(runs[a], runs[b])])


def context(runs: dict) -> dict:
    """Per configuration: median requests/s, median p50/p99 latency, and failures (all rounds)."""
    out = {}
    for name, results in runs.items():
        row = {"rps_median": statistics.median(r["rps"] for r in results),
               "failures": sum(r["failures"] for r in results)}
        if results[0].get("latency_ms"):
            row["p50_ms_median"] = statistics.median(r["latency_ms"]["p50"] for r in results)
            row["p99_ms_median"] = statistics.median(r["latency_ms"]["p99"] for r in results)
            row["errors"] = [e for r in results for e in r["errors"]][:5]
        if all(r.get("cpu") for r in results):
            row["cpu_median"] = {key: statistics.median(r["cpu"][key] for r in results) for key in results[0]["cpu"]}
        out[name] = row
    return out


def cache_stats(server: ServerProcess) -> dict | None:
    """Effective-weight cache hits, misses and bound from the server's Prometheus endpoint, if it has one."""
    urls = [m.group(1) for line in server.output if (m := re.search(r"metrics on (http://\S+/metrics)", line))]
    if not urls:
        return None
    try:
        text = urllib.request.urlopen(urls[0], timeout=5).read().decode()
    except OSError:
        return None
    found = {m.group(1): float(m.group(2))
             for m in re.finditer(r"^maskbank_cache_(hits|misses|capacity_bytes)(?:_total)?\s+(\S+)$", text, re.M)}
    if "hits" not in found or "misses" not in found:
        return None
    total = found["hits"] + found["misses"]
    return {**found, "hit_rate": found["hits"] / total if total else None}


def maskbank(stack: contextlib.ExitStack, root: Path, *args: str, env: dict[str, str] | None = None) -> ServerProcess:
    server = stack.enter_context(ServerProcess(root, "--threads", str(THREADS), *args, env=env))
    return server


# ---------------------------------------------------------------- the four rows

def serve_overhead(load: LoadProcess, server: ServerProcess, grpc_default: ServerProcess,
                   floors: dict[str, FloorProcess]) -> dict:
    runs = alternate(load, {"maskbank": spec(server.url, cpu_pid=server.pid),
                            "grpc_default_poller": spec(grpc_default.url, cpu_pid=grpc_default.pid),
                            **{name: spec(f.url, parameters=False, cpu_pid=f.pid) for name, f in floors.items()}},
                     extra={"compute": lambda: compute_floor_rps(BATCH)})
    return {"vs_floor": ratios(runs, "maskbank", "floor"), "vs_compute": ratios(runs, "maskbank", "compute"),
            "vs_grpc_default_poller": ratios(runs, "maskbank", "grpc_default_poller"),
            **_aio_floors(runs), "context": context(runs)}


def _aio_floors(runs: dict) -> dict:
    """The aio floors (inline: the Python gRPC ceiling; executor: the thread hand-off) against the sync floor."""
    return {"aio_floor_vs_floor": ratios(runs, "aio_floor", "floor"),
            "aio_executor_floor_vs_floor": ratios(runs, "aio_executor_floor", "floor")}


def small_requests(load: LoadProcess, batching: ServerProcess, plain: ServerProcess, grpc_default: ServerProcess,
                   floors: dict[str, FloorProcess]) -> dict:
    small = {"clients": SMALL_CLIENTS, "batch": 1}
    runs = alternate(load, {"batching": spec(batching.url, cpu_pid=batching.pid, **small),
                            "no_delay": spec(plain.url, cpu_pid=plain.pid, **small),
                            "no_delay_grpc_default_poller": spec(grpc_default.url, cpu_pid=grpc_default.pid, **small),
                            **{name: spec(f.url, parameters=False, cpu_pid=f.pid, **small) for name, f in floors.items()}})
    return {"batching_vs_floor": ratios(runs, "batching", "floor"), "no_delay_vs_floor": ratios(runs, "no_delay", "floor"),
            "no_delay_vs_grpc_default_poller": ratios(runs, "no_delay", "no_delay_grpc_default_poller"),
            **_aio_floors(runs), "context": context(runs)}


def task_mix(load: LoadProcess, single: ServerProcess, mixes: dict[int, ServerProcess], roots: dict[int, Path],
             sized: dict[str, ServerProcess]) -> dict:
    """Each mix against the single task, every server with the default --cache-bytes; and the largest
    mix again on servers with other cache sizes (`sized`, by label). Each server is warmed up for
    MIX_WARMUP_SECONDS first: long enough for uniformly random requests to have asked for every task
    (what a cache that holds them all then keeps), so rounds measure the steady state, not the filling."""
    largest = max(mixes)
    phases = {"single": spec(single.url)}
    phases |= {f"mix{t}": spec(server.url, tasks=list(range(t))) for t, server in mixes.items()}
    phases |= {f"mix{largest}_{label}": spec(server.url, tasks=list(range(largest))) for label, server in sized.items()}
    runs = alternate(load, phases, warmup_seconds=MIX_WARMUP_SECONDS)
    out = {f"{name}_vs_single": ratios(runs, name, "single") for name in phases if name != "single"}
    out["context"] = context(runs)
    out["cache"] = {name: cache_stats(server) for name, server in [
        ("single", single), *((f"mix{t}", s) for t, s in mixes.items()),
        *((f"mix{largest}_{label}", s) for label, s in sized.items())]}
    # Not timed: are the answers right? Every answer's logits against in-process logits of its task.
    smallest = min(mixes)
    registry = Registry(roots[smallest])
    references = reference_logits(registry, registry.manifest(MODEL).tasks, BATCH)
    checked = load.run(spec(mixes[smallest].url, tasks=list(range(smallest)), seconds=CHECK_SECONDS, check=True,
                            references=references))
    out["correctness"] = {"model_tasks": smallest, "requests": checked["requests"], "wrong": checked["wrong"],
                          "failures": checked["failures"], "wrong_examples": checked["wrong_examples"][:3]}
    return out


def hot_add(load: LoadProcess, server: ServerProcess, registry: Registry) -> dict:
    """HOT_ADDS tasks published HOT_SPACING s apart while 4 clients send GG requests (batch 32) on the
    served tasks; a probe thread in the load process asks for the next task id every 10 ms."""
    manifest = registry.manifest(MODEL)
    first = len(manifest.tasks)
    generator = torch.Generator().manual_seed(7)
    entries = [synthetic_entry(registry, manifest, first + i, generator) for i in range(HOT_ADDS)]  # blobs first
    references = reference_logits(registry, [*manifest.tasks, *entries], BATCH)
    seconds = HOT_ADDS * HOT_SPACING + 3.0
    load.submit(spec(server.url, seconds=seconds, warmup_seconds=0.0, probe_from=first, probe_interval=0.01,
                     check=True, references=references))
    published: dict[int, float] = {}
    began = time.monotonic()
    for entry in entries:
        time.sleep(max(0.0, began + (entry.id - first + 1) * HOT_SPACING - time.monotonic()))
        registry.publish(MODEL, lambda m, e=entry: m.next(tasks=(*m.tasks, e)))
        published[entry.id] = time.monotonic()
    result = load.result()
    found = {int(k): v for k, v in result["discovered"].items()}
    delays = [found[t] - published[t] for t in published if t in found]
    return {
        "delays_s": delays, "p50_s": statistics.median(delays) if delays else None,
        "max_s": max(delays) if delays else None, "not_served_in_time": [t for t in published if t not in found],
        "failures": result["failures"] + len(result["probe_errors"]), "errors": result["errors"] + result["probe_errors"],
        "wrong": result["wrong"], "wrong_examples": result["wrong_examples"][:3],
        "background_requests": result["requests"], "background_rps": result["rps"],
        "background_latency_ms": result["latency_ms"],
    }


# ---------------------------------------------------------------- report

def fmt(s: dict, unit: str = "x") -> str:
    return f"{s['median']:.2f}{unit} ({s['min']:.2f}-{s['max']:.2f})"


def _rows(results: dict) -> list[tuple]:
    """(benchmark, A, B, value, target, met) for every section in `results`."""
    rows = []
    if so := results.get("serve_overhead"):
        rows += [
            ("serve_overhead (a)", f"maskbank, GG batch {BATCH}, {CLIENTS} clients", "OIP floor server, same load",
             fmt(so["vs_floor"]), ">= 1.0x", so["vs_floor"]["median"] >= 1.0),
            ("serve_overhead (b)", f"maskbank, GG batch {BATCH}, {CLIENTS} clients",
             f"in-process dense forward, batch {BATCH}, 1 thread", fmt(so["vs_compute"]), "(reported)", None),
            ("serve_overhead (grpc poller)", f"maskbank, GG batch {BATCH}, {CLIENTS} clients",
             "the same on gRPC's default poller (GRPC_EXPERIMENTS empty)", fmt(so["vs_grpc_default_poller"]),
             "(reported)", None),
            ("serve_overhead (c)", "minimal grpc.aio OIP server computing inline (the Python gRPC ceiling)",
             "OIP floor server, same load", fmt(so["aio_floor_vs_floor"]), "(reported)", None),
            ("serve_overhead (d)", "minimal grpc.aio OIP server computing in a thread pool (run_in_executor)",
             "OIP floor server, same load", fmt(so["aio_executor_floor_vs_floor"]), "(reported)", None),
        ]
    if sr := results.get("small_requests"):
        rows += [
            ("small_requests", f"maskbank batch 1, {SMALL_CLIENTS} clients, --max-queue-delay-us {QUEUE_DELAY_US}",
             "OIP floor server, batch 1, same load", fmt(sr["batching_vs_floor"]), ">= 2x",
             sr["batching_vs_floor"]["median"] >= 2.0),
            ("small_requests (no delay)", f"maskbank batch 1, {SMALL_CLIENTS} clients, --max-queue-delay-us 0",
             "OIP floor server, batch 1, same load", fmt(sr["no_delay_vs_floor"]), "(reported)", None),
            ("small_requests (grpc poller)", f"maskbank batch 1, {SMALL_CLIENTS} clients, --max-queue-delay-us 0",
             "the same on gRPC's default poller (GRPC_EXPERIMENTS empty)", fmt(sr["no_delay_vs_grpc_default_poller"]),
             "(reported)", None),
            ("small_requests (ceiling)", "minimal grpc.aio OIP server computing inline, batch 1",
             "OIP floor server, batch 1, same load", fmt(sr["aio_floor_vs_floor"]), "(reported)", None),
            ("small_requests (executor)", "minimal grpc.aio OIP server computing in a thread pool, batch 1",
             "OIP floor server, batch 1, same load", fmt(sr["aio_executor_floor_vs_floor"]), "(reported)", None),
        ]
    if tm := results.get("task_mix"):
        for t in MIX_TASKS:
            s = tm[f"mix{t}_vs_single"]
            rows.append((f"task_mix {t}", f"maskbank, each request a random task of {t}",
                         "maskbank, one task (serve_overhead's load)", fmt(s), ">= 0.8", s["median"] >= 0.8))
        t = max(MIX_TASKS)
        s = tm[f"mix{t}_former_default_vs_single"]
        rows.append((f"task_mix {t}, 256 MiB cache", "the same, --cache-bytes 256MiB (the default before it was a "
                     "share of memory)", "maskbank, one task (serve_overhead's load)", fmt(s), "(reported)", None))
    if ha := results.get("hot_add"):
        p50 = ha["p50_s"]
        hot_ok = p50 is not None and p50 <= 1.0 and ha["failures"] == 0 and not ha["not_served_in_time"]
        rows.append(("hot_add", f"publish returns -> first success on the new task, {HOT_ADDS} adds under load "
                     f"(--poll-interval {POLL_INTERVAL})", "-",
                     (f"p50 {p50:.3f} s (max {ha['max_s']:.3f} s), {ha['failures']} failed requests"
                      + (f", {len(ha['not_served_in_time'])} adds not served in time" if ha["not_served_in_time"] else ""))
                     if p50 is not None else "no add served",
                     "p50 <= 1 s, 0 failures", hot_ok))
    return rows


def _checks(results: dict) -> list[str]:
    """The correctness-under-load rows of the sections in `results` that check answers."""
    rows = []
    if tc := results.get("task_mix", {}).get("correctness"):
        rows.append(f"| task_mix, random task of {tc['model_tasks']}, {CLIENTS} clients, batch {BATCH} "
                    f"({CHECK_SECONDS:g} s, untimed) | {tc['requests']} | {tc['wrong']} "
                    f"({tc['wrong'] / max(tc['requests'], 1):.1%}) | {tc['failures']} |")
    if ha := results.get("hot_add"):
        rows.append(f"| hot_add background load (tasks 0 and each added task) | {ha['background_requests']} | {ha['wrong']} "
                    f"({ha['wrong'] / max(ha['background_requests'], 1):.1%}) | {ha['failures']} |")
    return rows


def _cpu_cell(cpu: dict | None) -> str:
    if not cpu:
        return "-"
    return (f"{cpu['server_us']:.0f} / {cpu['client_us']:.0f} "
            f"({cpu['server_cores']:.2f} / {cpu['client_cores']:.2f})")


def tables(results: dict) -> str:
    lines = ["| benchmark | A | B (reference) | A / B: median (min-max) over rounds | target | met |", "|---|---|---|---|---|---|"]
    for name, a, b, value, target, ok in _rows(results):
        lines.append(f"| {name} | {a} | {b} | {value} | {target} | {'-' if ok is None else ('yes' if ok else 'NO')} |")
    ctx = ["| section | configuration | requests/s (median) | p50 ms | p99 ms | failed requests "
           "| CPU µs per request: server / load generator (cores) |", "|---|---|---|---|---|---|---|"]
    for section in ("serve_overhead", "small_requests", "task_mix"):
        for name, row in results.get(section, {}).get("context", {}).items():
            p50, p99 = row.get("p50_ms_median"), row.get("p99_ms_median")
            ctx.append(f"| {section} | {name} | {row['rps_median']:.0f} | {'-' if p50 is None else f'{p50:.2f}'} | "
                       f"{'-' if p99 is None else f'{p99:.2f}'} | {row['failures']} | {_cpu_cell(row.get('cpu_median'))} |")
    if ha := results.get("hot_add"):
        lat = ha["background_latency_ms"]
        ctx.append(f"| hot_add | background load during the adds | {ha['background_rps']:.0f} | {lat['p50']:.2f} | "
                   f"{lat['p99']:.2f} | {ha['failures']} | - |")
    cache = ", ".join(f"{name}: {c['hit_rate']:.1%} hits of {c['capacity_bytes'] / 1e6:,.0f} MB"
                      for name, c in results.get("task_mix", {}).get("cache", {}).items() if c and c["hit_rate"] is not None)
    check = ["| where | answers checked | answers with logits other than their task's | failed requests |", "|---|---|---|---|",
             *_checks(results)]
    return ("\n".join(lines) + "\n\nCorrectness under load (every answer's logits against in-process logits of the task that "
            "answered, np.allclose rtol=atol=1e-4):\n\n" + "\n".join(check)
            + "\n\nAbsolute figures, for context only (noisy shared machine; compare the ratios):\n\n"
            + "\n".join(ctx) + (f"\n\ntask_mix effective-weight cache (hit rate over the whole section, warm-up included, and bound): {cache}" if cache else ""))


def floor_grpc(aio: str | None) -> dict[str, str]:
    """Each floor on its faster gRPC setting, so that no ratio to it is the setting's doing: the aio
    floors on the one `maskbank serve` runs with (SERVE_GRPC_EXPERIMENTS: less CPU per request for
    aio servers), the synchronous floor on gRPC's defaults (that setting cost it 3-8% of its
    requests/s at batch 1, side by side). A GRPC_EXPERIMENTS of this process's applies to every
    floor and maskbank server, except the one on gRPC's defaults that the "grpc poller" rows compare
    with (then those rows compare that setting with the defaults; setup records it)."""
    given = os.environ.get("GRPC_EXPERIMENTS")
    return {"GRPC_EXPERIMENTS": given if given is not None else (SERVE_GRPC_EXPERIMENTS if aio else "")}


def _measure(sections: tuple[str, ...], root: Path, stack: contextlib.ExitStack) -> dict:
    """Run `sections` (in SECTIONS order) against servers on the registries under `root`; each server
    starts when the first section that needs it does."""
    results: dict = {}
    load = stack.enter_context(LoadProcess(lifetime=900))
    needs_floor = {"serve_overhead", "small_requests"} & set(sections)
    floors = {name: stack.enter_context(FloorProcess(SIZES, threads=THREADS, aio=aio, env=floor_grpc(aio)))
              for name, aio in (("floor", None), ("aio_floor", "inline"), ("aio_executor_floor", "executor"))
              } if needs_floor else {}
    single = maskbank(stack, root / "base") if needs_floor or "task_mix" in sections else None
    # the same server on gRPC's default poller: what `maskbank serve` setting GRPC_EXPERIMENTS saves (README)
    grpc_default = maskbank(stack, root / "base", env={"GRPC_EXPERIMENTS": ""}) if needs_floor else None
    if "serve_overhead" in sections:
        results["serve_overhead"] = serve_overhead(load, single, grpc_default, floors)
    if "small_requests" in sections:
        batching = maskbank(stack, root / "base", "--max-queue-delay-us", str(QUEUE_DELAY_US))
        results["small_requests"] = small_requests(load, batching, single, grpc_default, floors)
        batching.stop()
    if grpc_default is not None:
        grpc_default.stop()
    for floor in floors.values():
        floor.stop()
    if "task_mix" in sections:
        mixes = {t: maskbank(stack, root / f"mix{t}") for t in MIX_TASKS}
        largest = root / f"mix{max(MIX_TASKS)}"
        sized = {"former_default": maskbank(stack, largest, "--cache-bytes", str(FORMER_CACHE_BYTES))}
        results["task_mix"] = task_mix(load, single, mixes, {t: root / f"mix{t}" for t in MIX_TASKS}, sized)
        for server in [*mixes.values(), *sized.values()]:
            server.stop()
    if single is not None:
        single.stop()
    if "hot_add" in sections:
        hot = maskbank(stack, root / "hot", "--poll-interval", str(POLL_INTERVAL))
        results["hot_add"] = hot_add(load, hot, Registry(root / "hot"))
    return results


def main(sections: tuple[str, ...] = SECTIONS, results_path: Path = RESULTS) -> None:
    torch.set_num_threads(THREADS)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="maskbank-bench-") as tmp, contextlib.ExitStack() as stack:
        root = Path(tmp)
        train_base(root / "base")
        if "task_mix" in sections:
            for t in MIX_TASKS:
                shutil.copytree(root / "base", root / f"mix{t}")
                add_synthetic_tasks(Registry(root / f"mix{t}"), t, seed=t)
        if "hot_add" in sections:
            shutil.copytree(root / "base", root / "hot")
        setup_s = time.monotonic() - started
        results = _measure(sections, root, stack)
    total_s = time.monotonic() - started
    setup = {"sections": list(sections), "threads": THREADS, "sizes": SIZES, "repeats": REPEATS, "phase_seconds": PHASE_SECONDS,
             "warmup_seconds": WARMUP_SECONDS, "batch": BATCH, "clients": CLIENTS, "small_clients": SMALL_CLIENTS,
             "queue_delay_us": QUEUE_DELAY_US, "mix_tasks": list(MIX_TASKS), "synthetic_density": DENSITY,
             "hot_adds": HOT_ADDS, "hot_spacing_s": HOT_SPACING, "poll_interval_s": POLL_INTERVAL,
             "load_client": "raw gRPC (pre-serialised requests, every reply parsed), one channel and connection per client thread",
             "load_average": os.getloadavg(),
             "grpc_experiments": os.environ.get("GRPC_EXPERIMENTS", SERVE_GRPC_EXPERIMENTS),
             "setup_seconds": round(setup_s, 1), "total_seconds": round(total_s, 1)}
    print(f"maskbank serving, MLP {SIZES} (SupSup, 1 trained task + synthetic ones for task_mix/hot_add); "
          f"torch.set_num_threads({THREADS}) in every process; {REPEATS} alternating rounds of {PHASE_SECONDS} s phases "
          f"(+{WARMUP_SECONDS} s warm-up each); load from one separate process; {total_s:.0f} s in all; "
          f"machine load average at the end {setup['load_average'][0]:.1f}\n")
    print(tables(results) + "\n")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps({"benchmark": "serving", "setup": setup, **results}, indent=2) + "\n")
    print(f"wrote {results_path}")


def cli(argv: list[str]) -> None:  # not `main`: `python -m bench` calls main() with no arguments
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections; their JSON goes to bench/results/serving-<sections>.json, "
                             "so the full run's serving.json is left as it was")
    only = tuple(s for s in SECTIONS if s in parser.parse_args(argv).only)
    main(only, RESULTS if only == SECTIONS else RESULTS.with_name(f"serving-{'+'.join(only)}.json"))


if __name__ == "__main__":
    cli(sys.argv[1:])
