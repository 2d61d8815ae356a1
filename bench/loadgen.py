"""A bounded load generator for OIP servers (maskbank serve, bench.oip_floor), run in its own process.

One *phase* is described by a JSON spec; `run_phase(spec)` runs it with `clients` threads, each with
its own gRPC channel and TCP connection (client "raw": pre-serialised ModelInferRequest bytes through
a plain channel, responses parsed and checked; small_requests measured the same with the threads
sharing one connection, grpc's default) or its own `tritonclient.grpc.InferenceServerClient` (client "triton").
Every phase is bounded twice: by `seconds` and by `max_requests`; the process itself exits after
`lifetime` seconds whatever happens. Only loopback addresses are accepted. This module does not
import torch (nothing here computes).

Spec keys (defaults in DEFAULTS):
  url, model, clients, batch, features, classes, seconds, warmup_seconds, max_requests, client
  tasks: task ids a GG request picks from uniformly (None: the tasks discovered by the probe); each
      phase a process runs draws a fresh sequence (its phase number is part of the seed), so that a
      frequency-based cache cannot profit from a sequence replayed phase after phase
  gn_share, gn_mode: the share of requests sent without a task (GN) and their task_inference mode
  probe_from: if set, a probe thread asks for task ids probe_from, probe_from + 1, ... every
      probe_interval seconds; NOT_FOUND is the expected answer until the task is served; the first
      success time (time.monotonic(), comparable across processes) is recorded, and the task joins
      the pool GG requests pick from.
  probe_until: with probe_from, a count N: the phase runs for at least `seconds` and then on
      (up to MAX_SECONDS) until the probe has found N tasks, so a slow publisher (a busy machine)
      shortens nothing that a test asserts about.

  cpu_pid: a server's process id: the answer then says how much CPU the server and this load
      generator spent per counted request over the measured window (Linux /proc; None elsewhere)
  check: compare every answer's logits with the reference of the task that answered it (GG: the
      task asked for; GN: the task the response names): `references` {task id: logits} when given,
      else the first answer seen for that task; np.allclose(rtol=1e-4, atol=1e-4), since the dynamic
      batcher may merge rows and change the last bits. A mismatch counts in `wrong`.

The answer (a dict, JSON on stdout): requests (successful and counted, i.e. started after the
warm-up), failures (every failed request, warm-up included), errors (the first few messages),
wrong / wrong_examples (answers whose logits are not their task's, with `check`),
seconds (measured window), rps, latency_ms {p50, p90, p99, max}, discovered {task id: monotonic
time}, probe_errors (probe answers other than NOT_FOUND), gg / gn (counted requests of each kind),
cpu (with cpu_pid: server_cores / client_cores, the CPU each used over the window in cores, and
server_us / client_us per counted request).

Use from another process:
  `python -m bench.loadgen '<spec json>'` runs one phase and prints its JSON answer;
  `LoadProcess` keeps one worker process (`python -m bench.loadgen --worker`) and sends it phases.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULTS = {
    "url": None, "model": "bench", "clients": 4, "batch": 32, "features": 64, "classes": 10,
    "seconds": 3.0, "warmup_seconds": 0.3, "max_requests": 200_000, "client": "raw",
    "tasks": [0], "gn_share": 0.0, "gn_mode": "exhaustive", "probe_from": None, "probe_interval": 0.01,
    "probe_until": None,
    "seed": 0, "parameters": True, "check": False, "references": None, "cpu_pid": None,
}
MAX_SECONDS = 120.0  # no single phase may run longer than this, whatever the spec says
INFER = "/inference.GRPCInferenceService/ModelInfer"
ROOT = Path(__file__).resolve().parents[1]


def _check_url(url: str) -> None:
    host = url.rsplit(":", 1)[0]
    if host not in ("127.0.0.1", "localhost", "[::1]"):
        raise ValueError(f"load generators only talk to loopback addresses, not {url!r}")


class _Requests:
    """Serialised requests, built once: one per GG task id (built on demand) and one GN request."""

    def __init__(self, spec: dict):
        import numpy as np
        from tritonclient.grpc import service_pb2 as pb

        self.pb = pb
        self.spec = spec
        rng = np.random.default_rng(spec["seed"])
        self.x = rng.random((spec["batch"], spec["features"]), dtype=np.float32)
        self._raw = self.x.tobytes()
        self._cache: dict = {}
        self._lock = threading.Lock()

    def raw(self, task: int | None) -> bytes:
        key = task
        with self._lock:
            if key not in self._cache:
                request = self.pb.ModelInferRequest(model_name=self.spec["model"])
                request.inputs.add(name="input", datatype="FP32", shape=list(self.x.shape))
                request.raw_input_contents.append(self._raw)
                if self.spec["parameters"]:
                    if task is None:
                        request.parameters["task_inference"].string_param = self.spec["gn_mode"]
                    else:
                        request.parameters["task_id"].int64_param = task
                self._cache[key] = request.SerializeToString()
            return self._cache[key]

    def check(self, reply: bytes):
        """Parse a raw reply and check its logits' size (the first output is the logits); return
        (the task id the response names or None, the logits) when the spec asks for checks."""
        response = self.pb.ModelInferResponse.FromString(reply)
        want = self.spec["batch"] * self.spec["classes"] * 4
        if not response.raw_output_contents or len(response.raw_output_contents[0]) != want:
            raise AssertionError(f"bad response: {len(response.raw_output_contents)} raw outputs, "
                                 f"first of {len(response.raw_output_contents[0]) if response.raw_output_contents else 0} bytes; want {want}")
        if not self.spec["check"]:
            return None
        import numpy as np

        logits = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(self.spec["batch"], self.spec["classes"])
        task = response.parameters["task_id"].int64_param if "task_id" in response.parameters else None
        return task, logits


class _Pool:
    """The task ids GG requests pick from; the probe adds the tasks it discovers."""

    def __init__(self, tasks):
        self.tasks = list(tasks or [])
        self.lock = threading.Lock()

    def pick(self, rng: random.Random) -> int | None:
        with self.lock:
            return rng.choice(self.tasks) if self.tasks else None


def _triton_call(spec: dict, requests: _Requests):
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(spec["url"])

    def call(task: int | None, raw: bytes | None = None):
        inp = triton.InferInput("input", list(requests.x.shape), "FP32")
        inp.set_data_from_numpy(requests.x)
        parameters = None
        if spec["parameters"]:
            parameters = {"task_inference": spec["gn_mode"]} if task is None else {"task_id": task}
        result = client.infer(spec["model"], [inp], parameters=parameters)
        logits = result.as_numpy("logits")
        if logits is None or logits.shape != (spec["batch"], spec["classes"]):
            raise AssertionError(f"bad logits: {None if logits is None else logits.shape}")
        if spec["check"]:
            return int(result.as_numpy("task_id")[0]), logits
        return None

    return call, client.close


def _raw_call(spec: dict, requests: _Requests):
    import grpc

    # its own TCP connection: grpc would otherwise share one subchannel between the channels to one address
    channel = grpc.insecure_channel(spec["url"], options=[("grpc.use_local_subchannel_pool", 1)])
    method = channel.unary_unary(INFER)  # bytes in, bytes out

    def call(task: int | None, raw: bytes | None = None):
        return requests.check(method(raw if raw is not None else requests.raw(task), timeout=30))

    return call, channel.close


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of process `pid` (None: this process); None where /proc cannot tell."""
    if pid is None:
        return time.process_time()
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime, in clock ticks


def _cpu_use(before: tuple, after: tuple, seconds: float, requests: int) -> dict | None:
    """Cores used and microseconds per request by the server and this client between two samples."""
    if None in before or None in after or not requests:
        return None
    (server0, client0), (server1, client1) = before, after
    return {"server_cores": (server1 - server0) / seconds, "client_cores": (client1 - client0) / seconds,
            "server_us": 1e6 * (server1 - server0) / requests, "client_us": 1e6 * (client1 - client0) / requests}


def _message(error: BaseException) -> str:
    code = getattr(error, "code", None)
    if callable(code):
        try:
            return f"{code().name}: {error.details()}"
        except Exception:  # noqa: BLE001
            pass
    status = getattr(error, "status", None)
    if callable(status):
        return f"{status()}: {error.message()}"
    return f"{type(error).__name__}: {error}"


def _not_found(error: BaseException) -> bool:
    code = getattr(error, "code", None)
    if callable(code):
        try:
            return code().name == "NOT_FOUND"
        except Exception:  # noqa: BLE001
            return False
    status = getattr(error, "status", None)
    return callable(status) and status() == "StatusCode.NOT_FOUND"


_PHASES = itertools.count()  # phases run by this process: part of each client's seed


def run_phase(spec: dict) -> dict:
    """Run one bounded load phase against spec['url'] and return its numbers."""
    spec = {**DEFAULTS, **spec}
    _check_url(spec["url"])
    phase = next(_PHASES)
    seconds = min(float(spec["seconds"]), MAX_SECONDS)
    requests = _Requests(spec)
    make = _triton_call if spec["client"] == "triton" else _raw_call
    pool = _Pool(spec["tasks"])
    lock = threading.Lock()
    latencies: list[float] = []
    counts = {"requests": 0, "failures": 0, "gg": 0, "gn": 0, "started": 0, "wrong": 0}
    errors: list[str] = []
    wrong: list[str] = []
    references: dict = {}
    if spec["references"]:
        import numpy as np

        references.update({int(t): np.asarray(v, dtype=np.float32) for t, v in spec["references"].items()})

    def verify(asked: int | None, answer) -> None:
        """With `check`: the answer's logits must be those of the task that answered (see above)."""
        if answer is None:
            return
        import numpy as np

        named, logits = answer
        task = asked if asked is not None else named
        problem = None
        if asked is not None and named is not None and named != asked:
            problem = f"asked for task {asked}, the response names task {named}"
        else:
            with lock:
                reference = references.setdefault(task, logits.copy())
            if not np.allclose(logits, reference, rtol=1e-4, atol=1e-4):
                problem = (f"{'GG' if asked is not None else 'GN'} task {task}: logits differ from the task's reference "
                           f"by up to {float(np.abs(logits - reference).max()):.3g}")
        if problem:
            with lock:
                counts["wrong"] += 1
                if len(wrong) < 10:
                    wrong.append(problem)

    discovered: dict[int, float] = {}
    probe_errors: list[str] = []
    probing = spec["probe_from"] is not None
    ready = threading.Barrier(spec["clients"] + 1 + probing)
    times = {}

    def client(index: int) -> None:
        rng = random.Random((spec["seed"] * 1_000_000 + phase) * 1000 + index)
        call, close = make(spec, requests)
        for task in spec["tasks"] or []:  # serialise up front, outside the timed window
            requests.raw(task)
        mine: list[float] = []
        try:
            ready.wait()
            warm = times["warm"]
            while True:
                began = time.monotonic()
                if began >= times["end"]:  # read each time: the probe may move it (probe_until)
                    break
                with lock:
                    if counts["started"] >= spec["max_requests"]:
                        break
                    counts["started"] += 1
                gn = spec["gn_share"] > 0 and rng.random() < spec["gn_share"]
                task = None if gn else pool.pick(rng)
                if task is None and not gn:
                    time.sleep(0.005)  # nothing servable yet
                    continue
                try:
                    verify(task, call(task))
                except Exception as error:  # noqa: BLE001  every failure is counted and kept
                    with lock:
                        counts["failures"] += 1
                        if len(errors) < 10:
                            errors.append(f"{'GN' if gn else f'GG task {task}'}: {_message(error)}")
                    continue
                done = time.monotonic()
                if began >= warm:
                    mine.append(done - began)
                    with lock:
                        counts["requests"] += 1
                        counts["gn" if gn else "gg"] += 1
                        times["last"] = max(times.get("last", 0.0), done)
        finally:
            close()
            with lock:
                latencies.extend(mine)

    def probe() -> None:
        call, close = make(spec, requests)
        task = spec["probe_from"]
        try:
            ready.wait()
            while time.monotonic() < times["end"]:
                try:
                    call(task)
                except Exception as error:  # noqa: BLE001
                    if not _not_found(error) and len(probe_errors) < 10:
                        probe_errors.append(f"probe task {task}: {_message(error)}")
                    time.sleep(spec["probe_interval"])
                    continue
                discovered[task] = time.monotonic()
                with pool.lock:
                    pool.tasks.append(task)
                task += 1
                if spec["probe_until"] is not None and len(discovered) >= spec["probe_until"]:
                    times["end"] = max(times["nominal_end"], time.monotonic())
                    break
        finally:
            close()

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(spec["clients"])]
    if probing:
        threads.append(threading.Thread(target=probe, daemon=True))
    for thread in threads:
        thread.start()
    now = time.monotonic()
    nominal_end = now + spec["warmup_seconds"] + seconds
    until = probing and spec["probe_until"] is not None
    times.update(start=now, warm=now + spec["warmup_seconds"], nominal_end=nominal_end,
                 end=now + spec["warmup_seconds"] + MAX_SECONDS if until else nominal_end)
    ready.wait()
    cpu = None
    if spec["cpu_pid"] is not None:  # sampled where the counted requests begin and once every client is done
        time.sleep(max(0.0, times["warm"] - time.monotonic()))
        cpu = (_cpu_seconds(spec["cpu_pid"]), _cpu_seconds(None)), time.monotonic()
    for thread in threads:
        thread.join(max(0.0, times["end"] - time.monotonic()) + 60)
    if cpu is not None:
        cpu = _cpu_use(cpu[0], (_cpu_seconds(spec["cpu_pid"]), _cpu_seconds(None)), time.monotonic() - cpu[1],
                       counts["requests"])
    window = max(times.get("last", times["end"]) - times["warm"], 1e-9)
    latencies.sort()

    def pct(q: float) -> float | None:
        return 1e3 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else None

    return {
        "requests": counts["requests"], "failures": counts["failures"], "errors": errors,
        "wrong": counts["wrong"], "wrong_examples": wrong,
        "gg": counts["gg"], "gn": counts["gn"], "seconds": window, "rps": counts["requests"] / window,
        "latency_ms": {"p50": pct(0.50), "p90": pct(0.90), "p99": pct(0.99), "max": pct(1.0),
                       "mean": 1e3 * statistics.fmean(latencies) if latencies else None},
        "discovered": {str(k): v for k, v in discovered.items()}, "probe_errors": probe_errors,
        "clients": spec["clients"], "batch": spec["batch"], "client": spec["client"], "cpu": cpu,
    }


class LoadProcess:
    """A load-generator worker in its own process: `run(spec)` sends it one phase and waits for
    the answer; `submit(spec)` / `result()` do the same in two steps. Exits by itself after
    `lifetime` seconds or when the parent closes its stdin."""

    def __init__(self, lifetime: float = 900.0):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "bench.loadgen", "--worker", "--lifetime", str(lifetime)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )

    def submit(self, spec: dict) -> None:
        self._process.stdin.write(json.dumps(spec) + "\n")
        self._process.stdin.flush()

    def result(self) -> dict:
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited (status {self._process.poll()})")
        answer = json.loads(line)
        if "exception" in answer:
            raise RuntimeError(f"load generator failed: {answer['exception']}")
        return answer

    def run(self, spec: dict) -> dict:
        self.submit(spec)
        return self.result()

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> "LoadProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _worker(lifetime: float) -> None:
    def expire():
        time.sleep(lifetime)
        os._exit(3)  # bounded no matter what the parent does

    threading.Thread(target=expire, daemon=True).start()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            answer = run_phase(json.loads(line))
        except Exception as error:  # noqa: BLE001  reported to the parent, which raises
            answer = {"exception": f"{type(error).__name__}: {error}"}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


def cli(argv: list[str]) -> None:  # not `main`: `python -m bench` runs every module with a main()
    if argv[:1] == ["--worker"]:
        lifetime = float(argv[argv.index("--lifetime") + 1]) if "--lifetime" in argv else 900.0
        _worker(lifetime)
        return
    if len(argv) != 1:
        sys.exit("usage: python -m bench.loadgen '<spec json>'  |  python -m bench.loadgen --worker [--lifetime S]")
    print(json.dumps(run_phase(json.loads(argv[0]))), flush=True)


if __name__ == "__main__":
    cli(sys.argv[1:])
