"""The served models: one current snapshot per registry model, following the registry.

`refresh()` loads every model whose newest generation differs from the one served, in the
caller's thread, and swaps the snapshot pointer only once the new one is fully loaded, so a
request sees the old generation or the new one, never a half-loaded model. A generation that
fails to load is logged and skipped; the previous snapshot keeps serving. `follow()` runs
refresh in a background thread every `interval` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import torch

from registry import MaskbankError, ModelNotFound, Registry, RegistryUnreachable

from .cache import LRUCache
from .errors import InvalidRequest, ModelUnavailable, VersionNotLoaded
from .memory import DEFAULT_CACHE_SHARE, check_cache_setting, resolve_cache_bytes
from .snapshot import Snapshot

log = logging.getLogger("maskbank.serving")


FALLBACK_GENERATIONS = 16  # how many generations before an unloadable newest one a starting server tries
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 1.0, 60.0  # polls retry tasks out of service (or a replaced generation
# that did not load), waiting twice as long each time
KEEP, LOAD, WAIT = "keep", "load", "wait"  # what a refresh does with a model whose newest generation is the one served
TASKS, REPLACEMENT, BELOW = "tasks", "replacement", "below"  # what polls retry (the tasks out of service; what
# replaced the served generation), and the mark of a newest generation below the served one


class ModelRepository:
    """The served models, one current snapshot each (see the module's docstring).

    Args:
        registry: where the models come from.
        cache_bytes: bound of the cache shared by every snapshot (effective weights, mask matrices):
            bytes, or a share of memory like "25%" (serving/memory.py). Every key put there starts
            with its model's name, so that unloading a model frees its entries.
        gradients: prepare every loaded model for the gradient task-inference modes (its mask stack)
            before serving it, as a server whose default mode is one of them wants; without it a
            model is prepared from its second generation on, once a request used them.
        device: where PyTorch runs the forwards and keeps the backbones and cached weights
            (`cpu`, `cuda`, `cuda:1`, ...).
        only: serve only these models of the registry (None: every model, those published later
            included); the others are listed as unloaded, and an explicit `load` adds one.
    """

    def __init__(self, registry: Registry, cache_bytes: int | str = DEFAULT_CACHE_SHARE, gradients: bool = False,
                 device: torch.device | str = "cpu", only: list[str] | None = None):
        self.registry = registry
        self.device = torch.device(device)
        check_cache_setting(cache_bytes)
        self.cache = LRUCache(resolve_cache_bytes(cache_bytes, self.device).bytes)
        self.gradients = gradients
        self._snapshots: dict[str, Snapshot] = {}
        self._load_errors: dict[str, str] = {}
        self._fallen_back: dict[str, int] = {}  # model -> the newest generation an older one was looked for instead of
        self._unloaded: dict[str, int] = {}  # models an operator unloaded (the generation they served, 0 if none):
        # not followed until loaded again
        self._loading: set[str] = set()  # models a load() is bringing in now, not served yet
        self._only = None if only is None else set(only)  # the models this server follows, if not all
        self._named = frozenset(only or ())  # those it was started with: it is not ready while one is not served
        self._refresh_lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []  # called after every swap and unload (add_listener)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by poll_now and close: the follower polls (or stops) without waiting
        self._thread: threading.Thread | None = None
        self._gone: list[str] = []  # served models the registry last listed without (warned about once)
        self._poll_error: str | None = None  # why the last poll failed (logged once), None after one succeeds
        self._published: dict[str, bool] | None = None  # the last poll's listing: has each model a generation?
        self._manifest_seen: dict[str, tuple] = {}  # model -> the storage version (_fingerprint) of its served generation's
        # manifest file when last found to be the one served
        self._retry: dict[tuple[str, str], tuple[float, float]] = {}  # (model, TASKS or REPLACEMENT) -> (when polls
        # next retry its tasks out of service, or a replacement of its generation that did not load; the wait after)
        self._replacing: dict[str, tuple] = {}  # model -> what replaced its served generation and has not loaded:
        # (fingerprint, manifest) of another manifest under its number, or (BELOW, generation) of a lower newest one

    def models(self) -> list[str]:
        return sorted(self._snapshots)

    def awaited(self) -> list[str]:
        """The models this server was started with (--model) that it does not serve now (not published
        yet, or not loadable), an operator's unloads aside: until they are, it is not ready."""
        return sorted(model for model in self._named if model not in self._snapshots and model not in self._unloaded)

    def failing(self) -> list[str]:
        """The models whose registry generation the last refresh could not load (an older one, or none, serves)."""
        return sorted(self._load_errors)

    def get(self, model: str, version: str = "") -> Snapshot:
        """The current snapshot of `model`; `version`, if given, must be its generation."""
        snapshot = self._snapshots.get(model)
        if snapshot is None:
            if model in self._loading:
                raise ModelUnavailable(f"model '{model}' is being loaded (RepositoryModelLoad); retry in a moment")
            if model in self._unloaded:
                raise ModelNotFound(f"model '{model}' is unloaded; load it again (RepositoryModelLoad) to serve it")
            if model in self._load_errors:
                raise ModelUnavailable(f"model '{model}' is not served: {self._load_errors[model]}")
            if self._only is not None and model in self._only:
                raise ModelNotFound(f"model '{model}' is not served yet: this server serves it (--model) once a loadable "
                                    f"generation of it is in registry {self.registry.location}")
            known = ", ".join(self.models()) or "none"
            only = "" if self._only is None else "; this server serves only the models it was started with (--model)"
            raise ModelNotFound(f"no model named '{model}' is served (models: {known}{only})")
        if version and version != str(snapshot.generation):
            if not (version.isascii() and version.isdigit()):
                raise InvalidRequest(f"model version '{version}' is not a number: a model's versions are its generation "
                                     f"numbers (the served one is '{snapshot.generation}'); omit the version to use it")
            if (version.lstrip("0") or "0") == str(snapshot.generation):  # "07", as Triton reads versions (not int():
                # Python refuses to read more than 4,300 digits, an INTERNAL error)
                return snapshot
            raise VersionNotLoaded(
                f"model '{model}' version '{version}' is not served; the served version is "
                f"'{snapshot.generation}' (the newest generation); omit the version to use it"
            )
        return snapshot

    def load(self, model: str) -> Snapshot:
        """Load (or refresh) `model` now, and follow it again if it was unloaded."""
        if not self.registry.latest_generation(model):
            raise ModelNotFound(f"registry {self.registry.location} has no model '{model}' to load "
                                f"(models: {', '.join(self.registry.published_models()) or 'none'})")
        self._loading.add(model)
        self._fallen_back.pop(model, None)  # asked for: an older generation may be looked for again
        try:
            self._unloaded.pop(model, None)
            if self._only is not None:
                self._only.add(model)
            self.refresh([model])
        finally:
            self._loading.discard(model)
            self._changed()  # a load that failed changed what is awaited too (readiness)
        if model in self._load_errors:  # as Triton's, a load that failed is an error, whatever serves
            served = self._snapshots.get(model)
            kept = f"; generation {served.generation} is served" if served is not None else ""
            raise ModelUnavailable(f"model '{model}': {self._load_errors[model]}{kept}")
        return self.get(model)

    def unload(self, model: str) -> None:
        """Stop serving `model` (requests get NOT_FOUND) until it is loaded again."""
        with self._refresh_lock:  # a refresh in flight must not bring it back
            if model not in self._snapshots and model not in self._load_errors:
                raise ModelNotFound(f"model '{model}' is not loaded (loaded: {', '.join(self.models()) or 'none'})")
            unloaded = self._snapshots.pop(model, None)
            self._unloaded[model] = unloaded.generation if unloaded is not None else 0
            self._load_errors.pop(model, None)
            if unloaded is not None:
                unloaded.stop_caching()  # first: requests still running on it must not put back what is evicted
            entries, freed = self.cache.evict_where(lambda key: key[0] == model)  # keys start with the model's name
            if unloaded is not None:
                unloaded.retire()
        self._changed()
        log.info("unloaded model '%s' (%d cached entries, %.1f MB, freed)", model, entries, freed / 1e6)

    def add_listener(self, callback: Callable[[], None]) -> None:
        """Call `callback` (in the thread that made the change; it must be quick) after every snapshot
        swapped in and every unload: watchers look at what changed, rather than poll."""
        self._listeners.append(callback)

    def _changed(self) -> None:
        for callback in list(self._listeners):
            callback()

    def index(self) -> list[tuple[str, int, str, str]]:
        """(model, generation, state, reason) for every model of the registry or the server. From the
        registry as the last poll found it (`refresh` of every model), not read per call: a registry
        that is slow or stalled must not hold a caller (or a server thread per caller)."""
        published = self._published if self._published is not None else self._read_published()
        rows = []
        for model in sorted(set(published) | set(self._snapshots)):
            snapshot = self._snapshots.get(model)
            if snapshot is not None:  # ready, and why a newer generation is not served or tasks are out of service
                rows.append((model, snapshot.generation, "READY" if snapshot.healthy_tasks() else "UNAVAILABLE",
                             self._load_errors.get(model) or _out_of_service_reason(snapshot)))
            elif model in self._unloaded:  # Triton's state and reason for a model unloaded, with the version it served
                rows.append((model, self._unloaded[model], "UNAVAILABLE", "unloaded"))
            elif not self._follows(model):
                rows.append((model, 0, "UNAVAILABLE", "not among the models this server was started with (--model)"))
            elif model in self._load_errors or published.get(model):
                rows.append((model, 0, "UNAVAILABLE", self._load_errors.get(model, "not loaded yet")))
            # else: no generation under that name (a first publish under way, or a stray entry): not a model yet
        listed = {row[0] for row in rows}
        rows += [(model, 0, "UNAVAILABLE", "named with --model, not in the registry yet: the server is not ready "
                  "until it is served") for model in sorted(self._named - listed) if model not in self._unloaded]
        return sorted(rows)

    def _read_published(self) -> dict[str, bool]:
        """Whether each model the registry lists has a generation, read now (before any poll)."""
        return {model: bool(self.registry.latest_generation(model)) for model in self.registry.list_models()}

    def refresh(self, models: list[str] | None = None) -> list[Snapshot]:
        """Load what changed in the registry (for `models`, default all followed ones); return
        the snapshots swapped in, once their superposition is warm (Snapshot.warm)."""
        with self._refresh_lock:
            swapped = []
            listed = self.registry.list_models() if models is None else models
            if models is None and not listed and self._snapshots:  # a bucket deleted lists nothing: no registry,
                self.registry.check_location(must_exist=False)  # a failed poll, not one that "can be read again"
            if models is None:
                self._note_gone(listed)
                for model in set(self._load_errors) - set(listed) - set(self._snapshots):  # gone: not "unavailable"
                    del self._load_errors[model]
            published = dict.fromkeys(listed, True)  # models not followed count as published: index lists them
            for model in listed:
                if model in self._unloaded or not self._follows(model):
                    continue
                current, latest = self._snapshots.get(model), None
                try:
                    latest = published[model] = self.registry.latest_generation(model)
                    state = (KEEP if latest == 0 else LOAD if not current else
                             self._below(current, latest, explicit=models is not None) if latest < current.generation else
                             LOAD if latest > current.generation else self._state(current, explicit=models is not None))
                    if state == KEEP:
                        self._load_errors.pop(model, None)  # nothing newer failed: an earlier failure is over
                        continue
                    if state == WAIT:  # a retry not due yet: what failed still stands
                        continue
                    snapshot, failure = self._load_newest(model, latest, current)
                except Exception as error:  # noqa: BLE001  one model's failure, a bug's too, must not hold back the others
                    self._failed(model, latest, error, current)
                    continue
                self._snapshots[model] = snapshot
                for what in (TASKS, REPLACEMENT):
                    self._retry.pop((model, what), None)
                self._replacing.pop(model, None)
                self._changed()
                if current is not None:
                    current.retire()
                    self._evict_unused(snapshot, replaced=current.generation == snapshot.generation
                                       and current.manifest != snapshot.manifest)
                if failure is None:
                    self._load_errors.pop(model, None)
                else:
                    self._failed(model, latest, failure, snapshot, fallback=True)
                swapped.append(snapshot)
                log.info("serving model '%s' generation %d (%d tasks)", model, snapshot.generation, len(snapshot.tasks))
            if models is None:
                self._published = {model: bool(has) for model, has in published.items()}
        for snapshot in swapped:  # outside the lock: an explicit load need not wait for a large matrix
            snapshot.warm()
        return swapped

    def _state(self, current: Snapshot, explicit: bool) -> str:
        """What to do with `current`, whose generation is the registry's newest: KEEP it (the registry holds
        it, and no task out of service would load now), LOAD the generation again, or WAIT for a retry's
        time. An explicit load retries tasks out of service and reads the manifest at once; a poll retries
        at growing intervals (a missing blob may be one a copy has not brought yet) and reads the manifest
        only when its file changed (size or time)."""
        if explicit:
            return LOAD if current.out_of_service() or self._replacement(current, always=True) == LOAD else KEEP
        if current.out_of_service() and self._due(current.model, TASKS) and current.any_task_back(self.registry):
            return LOAD
        return self._replacement(current, always=False)

    def _due(self, model: str, what: str) -> bool:
        """Whether a retry of `what` (TASKS, REPLACEMENT) for `model` is due now: at once, then after
        RETRY_FIRST_SECONDS, twice as long each time up to RETRY_MAX_SECONDS (until a snapshot of it is
        swapped in, or the registry holds what is served again)."""
        now = time.monotonic()
        due, wait = self._retry.get((model, what), (0.0, RETRY_FIRST_SECONDS))
        if now < due:
            return False
        self._retry[(model, what)] = (now + wait, min(2 * wait, RETRY_MAX_SECONDS))
        return True

    def _below(self, current: Snapshot, latest: int, explicit: bool) -> str:
        """LOAD the registry's newest generation `latest`, below the one served (the model deleted and
        published again, or the registry restored from an older copy), said once; WAIT while one that did
        not load is not due for a retry (an explicit load tries at once)."""
        if self._replacing.get(current.model) == (BELOW, latest):
            return LOAD if explicit or self._due(current.model, REPLACEMENT) else WAIT
        log.warning("model '%s': the registry's newest generation is %d, below the %d served (the model was deleted "
                    "and published again, or the registry restored from an older copy): loading it",
                    current.model, latest, current.generation)
        self._replacing[current.model] = (BELOW, latest)
        return LOAD

    def _replacement(self, current: Snapshot, always: bool) -> str:
        """KEEP unless the registry's manifest of `current`'s generation is another one (the model deleted
        and published again between two polls, or the registry swapped for another copy): LOAD it, said
        once; WAIT while one that did not load is not due for a retry."""
        model = current.model
        seen = self._fingerprint(model, current.generation)  # before reading the manifest
        if not always and seen is not None and seen == self._manifest_seen.get(model):
            return KEEP
        pending = self._replacing.get(model)  # (fingerprint, manifest) of a replacement that has not loaded
        if not always and seen is not None and pending is not None and pending[0] == seen:
            return LOAD if self._due(model, REPLACEMENT) else WAIT
        manifest = self.registry.manifest(model, current.generation)
        if manifest == current.manifest:
            self._manifest_seen[model] = seen
            self._replacing.pop(model, None)
            self._retry.pop((model, REPLACEMENT), None)  # a later replacement is tried at once, then after 1 s, ...
            return KEEP
        if pending is None or pending[1] != manifest:
            log.warning("model '%s': generation %d in the registry is not the one served (the model was deleted and "
                        "published again, or the registry replaced by another copy): loading it", model,
                        current.generation)
        elif not always and not self._due(model, REPLACEMENT):
            return WAIT
        self._replacing[model] = (seen, manifest)
        return LOAD

    def _fingerprint(self, model: str, generation: int) -> tuple | None:
        """The storage's version of a generation's manifest file (local: size, time and inode; S3: size and
        ETag), or None where the store cannot say when a file changed (fsspec's HTTP): its manifest is
        then read on every poll."""
        try:
            return self.registry.storage.version(self.registry.manifest_key(model, generation))
        except NotImplementedError:
            return None

    def _load_newest(self, model: str, latest: int, current: Snapshot | None) -> tuple[Snapshot, Exception | None]:
        """Generation `latest` of `model`, and None. Where it does not load and nothing of the model is
        served yet (a server started after a bad publish), the newest of the FALLBACK_GENERATIONS before
        it that loads, and why `latest` did not: a server already running keeps serving its generation
        meanwhile, so a replica started later serves the same rather than nothing. Raises `latest`'s
        error when none loads (tried once per newest generation: a poll after that reads one manifest,
        not 17), and at once when the registry cannot be reached."""
        try:
            return self._load(model, latest, current), None
        except RegistryUnreachable:
            raise
        except Exception as error:  # noqa: BLE001  a crafted manifest may fail in any way
            if current is not None or self._fallen_back.get(model) == latest:
                raise  # tried for this newest generation already: once, not on every poll
            self._fallen_back[model] = latest
            for older in range(latest - 1, max(0, latest - 1 - FALLBACK_GENERATIONS), -1):
                try:
                    return self._load(model, older, None), error
                except RegistryUnreachable:
                    raise error from None
                except Exception:  # noqa: BLE001  as above
                    continue
            raise

    def _load(self, model: str, generation: int, current: Snapshot | None) -> Snapshot:
        return Snapshot.load(self.registry, self.registry.manifest(model, generation), current, self.cache,
                             self.gradients, self.device)

    def _failed(self, model: str, generation: int | None, error: Exception, served: Snapshot | None,
                fallback: bool = False) -> None:
        """Generation `generation` of `model` did not load: keep why (RepositoryIndex, RepositoryModelLoad
        and requests say it) and log it once per distinct error, with its traceback unless it is
        maskbank's own (whose message says it all)."""
        words = str(error) if isinstance(error, MaskbankError) else f"{type(error).__name__}: {error}"
        head = f"generation {generation} could not be loaded" if generation is not None else "its generations could not be listed"
        reason = f"{head}: {words}"
        if self._load_errors.get(model) != reason:
            kept = ("not served until a loadable generation is published" if served is None
                    else f"serving generation {served.generation}, the newest that loads" if fallback
                    else f"still serving generation {served.generation}")
            log.error("model '%s': %s (%s): %s", model, head, kept, words, exc_info=not isinstance(error, MaskbankError))
        self._load_errors[model] = reason

    def _evict_unused(self, snapshot: Snapshot, replaced: bool = False) -> None:
        """Drop the cache entries of `snapshot`'s model that it will never look up (Snapshot.uses), so
        a model whose backbone changes with each task does not fill the cache with dead weights; all of
        them when its generation was `replaced` by another manifest (a backbone version's name may then
        stand for other weights)."""
        entries, freed = self.cache.evict_where(
            lambda key: key[0] == snapshot.model and (replaced or not snapshot.uses(key)))
        if entries:
            log.info("model '%s': %d cached entries that generation %d no longer uses (%.1f MB) freed",
                     snapshot.model, entries, snapshot.generation, freed / 1e6)

    def _note_gone(self, listed: list[str]) -> None:
        """Log once when served models vanish from the registry's listing (a volume unmounted, a
        bucket emptied) and once when they are back. They stay served at the generation loaded:
        registries only grow, so a model that vanishes is more likely unreachable than deleted."""
        gone = sorted(set(self._snapshots) - set(listed))
        if gone and gone != self._gone:
            log.warning("registry %s no longer lists model(s) %s (not reachable there, or deleted): still serving "
                        "the generation loaded of each until it is back or unloaded", self.registry.location,
                        ", ".join(map(repr, gone)))
        back = sorted(set(self._gone) & set(listed))  # listed again (not: unloaded meanwhile)
        if back:
            log.info("registry %s lists model(s) %s again", self.registry.location, ", ".join(map(repr, back)))
        self._gone = gone

    def _follows(self, model: str) -> bool:
        """Whether this server serves `model` when the registry has it (--model, or loaded since)."""
        return self._only is None or model in self._only

    def follow(self, interval: float, initializer: Callable[[], None] | None = None) -> None:
        """Refresh every `interval` seconds in a daemon thread (which runs `initializer` first) until `close()`."""

        def loop():
            if initializer is not None:
                initializer()
            while True:
                self._wake.wait(interval)
                self._wake.clear()
                if self._stop.is_set():
                    break
                try:
                    self.refresh()
                except Exception as error:  # a poll must never kill the follower; the next one retries
                    self._poll_failed(error)
                else:
                    if self._poll_error is not None:
                        log.info("registry %s can be read again", self.registry.location)
                    self._poll_error = None

        self._thread = threading.Thread(target=loop, name="maskbank-follow", daemon=True)
        self._thread.start()

    def poll_now(self) -> None:
        """Have the follower poll the registry at once rather than at the end of its interval (SIGHUP):
        an operator who just published need not wait out a long --poll-interval. A poll under way is
        followed by one more."""
        self._wake.set()

    def _poll_failed(self, error: Exception) -> None:
        """Log a failed poll once per distinct error (with its traceback unless it is maskbank's own,
        whose message says it all): a registry unreachable for an hour must not log a traceback per
        poll. The models loaded keep serving."""
        reason = f"{type(error).__name__}: {error}"
        if reason != self._poll_error:
            log.error("refreshing models from %s failed, still serving the generations loaded; retrying every "
                      "poll: %s", self.registry.location, reason, exc_info=not isinstance(error, MaskbankError))
        self._poll_error = reason

    def close(self, timeout: float | None = None) -> None:
        """Stop following; wait up to `timeout` seconds (None: for ever) for a poll under way, which a
        registry that hangs (object storage retrying for a minute) may hold past a stop's grace period:
        it is left to end with the process (a daemon thread)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("stopping without waiting for the registry poll under way: %s has not answered it "
                            "for %g s", self.registry.location, timeout)


def _out_of_service_reason(snapshot: Snapshot) -> str:
    """What RepositoryIndex says of a model served with tasks out of service ("" if none)."""
    if not snapshot.tasks:  # a manifest made by hand: UNAVAILABLE, and why
        return "its manifest lists no task"
    broken = snapshot.out_of_service()
    if not broken:
        return ""
    return (f"task(s) {', '.join(str(t.entry.id) for t in broken)} out of service (a blob missing or corrupt: "
            "ListTasks says which; polls retry them, RepositoryModelLoad at once)")
