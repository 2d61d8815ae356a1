"""Admission control: a bound per model on the inference requests a server holds at once
(--max-queue-size, Triton's `max_queue_size`, which is per model too).

Without a bound, a server offered more requests than it can compute queues them all: each waits
longer than the last and holds its input in memory, until clients time out on answers that are
still computed. With a bound, a request that would exceed it is refused at once with UNAVAILABLE
(gRPC's retryable code; Triton answers a full queue the same way), before its input is decoded, so
the requests the server does take keep a bounded latency and a client or load balancer can send
the rest elsewhere or later. The bound counts the model's inference requests accepted and not yet
answered, waiting or computing, over every entry point (ModelInfer, each request of a
ModelStreamInfer, maskbank's InferTask); one model's flood does not refuse another model's requests.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from .errors import ServerBusy
from .logs import FloodLog

log = logging.getLogger("maskbank.serving")


class Admission:
    """Counts each model's inference requests in the server and refuses those beyond `limit` (0: no
    bound). Thread-safe; `pending()` and `rejected()` are read by the metrics endpoint. Models are
    counted by the name of the model served (never a name a client made up: the caller looks the
    model up first)."""

    def __init__(self, limit: int = 0):
        if limit < 0:
            raise ValueError(f"--max-queue-size must be 0 (no bound) or more, got {limit}")
        self.limit = limit
        self._pending: dict[str, int] = defaultdict(int)  # model -> accepted, not yet answered
        self._rejected: dict[str, int] = defaultdict(int)  # model -> refused since the server started
        self._lock = threading.Lock()
        self._refusals = FloodLog(log)

    def admit(self, model: str) -> "_Place":
        """`with admission.admit(model):` holds one of `model`'s places for the duration of the block;
        entering raises ServerBusy (nothing held) if none is free."""
        return _Place(self, model)

    def pending(self) -> dict[str, int]:
        """Each model's requests in the server now (models that have had any)."""
        with self._lock:
            return dict(self._pending)

    def rejected(self) -> dict[str, int]:
        """Each model's refused requests since the server started (models that have had any)."""
        with self._lock:
            return dict(self._rejected)

    def _enter(self, model: str) -> None:
        with self._lock:
            held = self._pending[model]
            if self.limit and held >= self.limit:
                self._rejected[model] += 1
                self._refusals.record("refused %d inference request(s) {since}, the latest for model '%s', which "
                                      "held %d, its bound (--max-queue-size); clients got UNAVAILABLE", model, held)
                raise ServerBusy(f"the server is busy: it holds {held} inference request{'s' if held != 1 else ''} "
                                 f"for model '{model}', "
                                 f"its bound (--max-queue-size {self.limit}); retry after a short backoff, or send "
                                 "to another replica")
            self._pending[model] = held + 1

    def _exit(self, model: str) -> None:
        with self._lock:
            self._pending[model] -= 1


class _Place:
    """One request's place in its model's bound, as a context manager (see Admission.admit)."""

    __slots__ = ("admission", "model")

    def __init__(self, admission: Admission, model: str):
        self.admission, self.model = admission, model

    def __enter__(self) -> None:
        self.admission._enter(self.model)

    def __exit__(self, *exc) -> None:
        self.admission._exit(self.model)
