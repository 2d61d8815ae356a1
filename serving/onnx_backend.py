"""The ONNX Runtime backend: a task's logits from the architecture's exported graph.

The graph is exported once per architecture (registry.onnx_export). Each task gets its own ONNX
Runtime session of that graph with the task's effective weights as initializers (the very model
`maskbank export onnx --layout self-contained` writes); the session lives in the server's
effective-weight LRU cache, sized by the task's weight bytes, so a task switch costs a cache
lookup, and a cold task one session creation, never a re-export.

Note:
    `SessionOptions.add_initializer` would spare the copy of the weights into the model, but
    ONNX Runtime 1.31 constant-folds the graph's own placeholder initializers (the transposes of
    the linear weights) before applying it, so its sessions compute with the placeholders
    (measured: logits off by hundreds). A self-contained model per task has no such trap.

Why sessions per task rather than the weights fed as graph inputs on every run: measured by
`python -m bench onnx_backend` (README), they run as fast on an MLP and about 2.4x as fast on a
conv net with BatchNorm, because ONNX Runtime folds the then-constant statistics into the
convolutions and pre-packs constant weights; the price is one session creation per cold task.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import sys
import threading
import time

import onnx
import onnxruntime as ort
import torch

from registry.onnx_export import INPUT, OUTPUT, architecture_graph, onnx_weights, self_contained, without_weights

from .snapshot import LoadedTask, Snapshot

log = logging.getLogger("maskbank.serving")
_LIBC = ctypes.CDLL(ctypes.util.find_library("c")) if sys.platform == "linux" else None
TRIM_INTERVAL_SECONDS = 1.0
CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_QUIET, _ERRORS = 4, 3  # ONNX Runtime log severities: fatal only; errors and worse


def choose_providers() -> list[str]:
    """[CUDA, CPU] when the CUDA provider is built in, a GPU is visible and the provider really
    loads; else [CPU]. Asking for CUDA without its libraries makes ONNX Runtime log errors and fall
    back, so the probe runs with its logging silenced."""
    if CUDA not in ort.get_available_providers() or not torch.cuda.is_available():
        return [CPU]
    ort.set_default_logger_severity(_QUIET)
    try:
        probe = ort.InferenceSession(architecture_graph({"arch": "mlp", "sizes": [1, 1]}).SerializeToString(),
                                     providers=[CUDA, CPU])
        usable = probe.get_providers()[0] == CUDA
    except Exception:  # noqa: BLE001  any failure to start CUDA means: run on the CPU
        usable = False
    finally:
        ort.set_default_logger_severity(_ERRORS)
    return [CUDA, CPU] if usable else [CPU]


class OnnxRuntimeBackend:
    """Runs task-given forwards in ONNX Runtime; thread-safe (a session may run on several threads)."""

    name = "onnxruntime"

    def __init__(self, *, threads: int | None = None):
        ort.set_default_logger_severity(_ERRORS)
        self.providers = choose_providers()
        self._threads = threads or 0  # 0: ONNX Runtime's default, one thread per physical core
        self._graphs: dict[str, tuple[onnx.ModelProto, onnx.ModelProto]] = {}  # per architecture (its spec as JSON)
        self._lock = threading.Lock()
        log.info("ONNX Runtime %s backend on %s (intra-op threads: %s)", ort.__version__, self.providers[0],
                 self._threads or "one per physical core")

    def logits(self, snapshot: Snapshot, task: LoadedTask, x: torch.Tensor) -> torch.Tensor:
        """[N, classes of the task] logits of `x` [N, features], computed by ONNX Runtime."""
        (logits,) = self._session(snapshot, task).run([OUTPUT], {INPUT: x.numpy()})
        return torch.from_numpy(logits)

    def logits_of(self, snapshot: Snapshot, tasks: list[LoadedTask], x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each task's logits of `x`, by task id: one session run per task."""
        return {task.entry.id: self.logits(snapshot, task, x) for task in tasks}

    def _session(self, snapshot: Snapshot, task: LoadedTask) -> ort.InferenceSession:
        def build() -> tuple[ort.InferenceSession, int]:
            built = self._build(snapshot, task)
            _FREED.give_back()  # of the build's copies of the weights, freed as _build returned
            return built

        key = (snapshot.model, snapshot.backbone_version(task), task.key, self.name)
        return snapshot.cache.get_or_create(key, build)  # kept while the snapshot is served

    def _build(self, snapshot: Snapshot, task: LoadedTask) -> tuple[ort.InferenceSession, int]:
        """The task's session, and the bytes of its weights (what the cache charges for it)."""
        graph, template = self._graph(snapshot.manifest.architecture)
        weights = onnx_weights(graph, snapshot.effective_parameters(task))
        model = self_contained(template, weights, task.entry.num_classes)
        return self._create(model.SerializeToString()), sum(a.nbytes for a in weights.values())

    def _graph(self, architecture: dict) -> tuple[onnx.ModelProto, onnx.ModelProto]:
        """The architecture's graph, exported on first use, and the same without its weights."""
        key = json.dumps(architecture, sort_keys=True)
        with self._lock:  # exported once per architecture, whichever request comes first
            if key not in self._graphs:
                graph = architecture_graph(architecture)
                self._graphs[key] = graph, without_weights(graph)
            return self._graphs[key]

    def _create(self, model: bytes) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        session = ort.InferenceSession(model, options, providers=self.providers)
        # ONNX Runtime's Python session keeps the serialized model, a second copy of every weight, for
        # nothing but re-creating itself on a fallback provider ("TODO: This is bad as we're holding the
        # memory indefinitely", onnxruntime 1.31). The providers were chosen by a probe session
        # (choose_providers), so fallback is off and the copy goes: python -m bench onnx_memory.
        session.disable_fallback()
        session._model_bytes = None
        return session


class _FreedMemory:
    """Gives the heap's free pages back to the system (glibc's malloc_trim; dask's trim_memory does the
    same), at most once every TRIM_INTERVAL_SECONDS, and once more after the last build of a burst.

    Building a session passes through copies of the task's weights (ONNX Runtime's own among them);
    glibc keeps what they freed in its heap, fragmented by the sessions built since. Untrimmed, a server
    grew by some 2.8x what the cache charged per cached session; trimmed after every build, 1.1x, but
    each build then took twice as long, faulting the returned pages back in. Once a second costs that
    only to the first build after a pause; the trim a timer runs after a burst lets memory settle
    without waiting for another build (python -m bench onnx_memory measures both)."""

    def __init__(self):
        self._trim = getattr(_LIBC, "malloc_trim", None)  # glibc only: musl and others have none
        self._lock = threading.Lock()
        self._last = float("-inf")
        self._pending = False

    def give_back(self) -> None:
        """After a build: trim now, or once the interval since the last trim has passed."""
        if self._trim is None:
            return
        with self._lock:
            wait = self._last + TRIM_INTERVAL_SECONDS - time.monotonic()
            if wait > 0:
                if not self._pending:  # one timer for a whole burst
                    self._pending = True
                    timer = threading.Timer(wait, self._trim_now)
                    timer.daemon = True
                    timer.start()
                return
            self._last = time.monotonic()
        self._trim(0)

    def _trim_now(self) -> None:
        with self._lock:
            self._pending, self._last = False, time.monotonic()
        self._trim(0)


_FREED = _FreedMemory()
