"""The server's model repository following a registry that goes away or cannot be read: the loaded
generations keep serving, and an operator reads one line when it happens and one when it is over,
not one per poll."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch

from registry import ModelNotFound, Registry
from serving.errors import ModelUnavailable
from serving import repository as repository_module
from serving.cache import LRUCache
from serving.metrics import MaskbankCollector
from serving.repository import ModelRepository
from serving.snapshot import Snapshot
from serving.statistics import Statistics

from .conftest import TINY, train_model, wait_for


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_models_that_vanish_from_the_registry_keep_serving_and_are_logged_once(tmp_path, caplog):
    train_model(tmp_path / "reg", "m", 1, TINY)
    location = Registry(tmp_path / "reg").location
    repository = ModelRepository(Registry(tmp_path / "reg"))
    repository.refresh()
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        (tmp_path / "reg").rename(tmp_path / "unmounted")
        for _ in range(3):
            repository.refresh()
        assert repository.models() == ["m"] and repository.get("m").generation == 1
        (tmp_path / "unmounted").rename(tmp_path / "reg")
        repository.refresh()
        repository.refresh()
    assert messages(caplog) == [
        f"registry {location} no longer lists model(s) 'm' (not reachable there, or deleted): still serving the "
        "generation loaded of each until it is back or unloaded",
        f"registry {location} lists model(s) 'm' again",
    ]


def test_a_vanished_model_unloaded_is_not_said_to_be_back(tmp_path, caplog):
    """Unloading a model the registry no longer lists logged that the registry lists it again."""
    train_model(tmp_path, "m", 1, TINY)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    (tmp_path / "models" / "m").rename(tmp_path / "m-moved")
    repository.refresh()
    repository.unload("m")
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        repository.refresh()
    assert not [m for m in messages(caplog) if "again" in m]


def test_a_model_that_failed_to_load_and_is_gone_is_not_found(tmp_path):
    """Its load error outlived it: requests were told it could not be loaded (UNAVAILABLE), not that
    there is no such model."""
    train_model(tmp_path, "m", 1, TINY)
    (tmp_path / "models" / "m" / "generations" / "0000000001.json").write_text("{")
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    with pytest.raises(ModelUnavailable):
        repository.get("m")
    shutil.rmtree(tmp_path / "models" / "m")
    repository.refresh()
    with pytest.raises(ModelNotFound, match="no model named 'm' is served"):
        repository.get("m")


def test_a_poll_that_fails_is_logged_once_until_the_registry_can_be_read_again(tmp_path, caplog, monkeypatch):
    """The registry's listing fails (a volume unmounted; here its listing raises as the system would):
    every poll fails the same way, which is logged once, with its traceback; serving goes on; once the
    registry can be read the next poll says so and loads what is new."""
    registry = train_model(tmp_path, "m", 1, TINY)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    unmounted, listing = True, repository.registry.storage.list_dir

    def list_dir(prefix: str) -> list[str]:
        if unmounted and prefix == "models":
            raise OSError(107, "Transport endpoint is not connected")
        return listing(prefix)

    monkeypatch.setattr(repository.registry.storage, "list_dir", list_dir)
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        repository.follow(0.02)
        try:
            wait_for(lambda: any("failed" in m for m in messages(caplog)), what="the failed poll to be logged")
            time.sleep(0.3)  # about 15 more polls, failing the same way
            failures = [r for r in caplog.records if "failed" in r.getMessage()]
            assert repository.get("m").generation == 1
            unmounted = False
            train_model(tmp_path, "m", 2, TINY)
            wait_for(lambda: repository.get("m").generation == 2, what="generation 2 to be served")
        finally:
            repository.close()
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR and failures[0].exc_info
    assert failures[0].getMessage().startswith(
        f"refreshing models from {registry.location} failed, still serving the generations loaded; retrying every "
        "poll: OSError:")
    assert f"registry {registry.location} can be read again" in messages(caplog)
    assert sum("failed" in m for m in messages(caplog)) == 1


def test_a_file_the_system_cannot_read_fails_its_model_only(tmp_path, caplog):
    """A manifest or blob the system refuses to read (a folder in its place here; no permission, a link
    loop) escaped as an OSError: no server started, and a running one stopped taking every model's
    new generations. Now it is that generation's or that task's problem, named, and the rest serves."""
    train_model(tmp_path, "m", 1, TINY)
    train_model(tmp_path, "n", 1, TINY)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    (tmp_path / "models" / "m" / "generations" / "0000000002.json").mkdir()  # m's next manifest: unreadable
    train_model(tmp_path, "n", 2, TINY)
    with caplog.at_level(logging.ERROR, logger="maskbank.serving"):
        repository.refresh()
        repository.refresh()
    assert (repository.get("m").generation, repository.get("n").generation) == (1, 2)
    failed = [m for m in messages(caplog) if "could not be loaded" in m]
    assert len(failed) == 1 and "model 'm': generation 2 could not be loaded (still serving generation 1): manifest " \
        in failed[0] and "0000000002.json cannot be read (Is a directory)" in failed[0]
    blob = Path(Registry(tmp_path).blobs.describe(Registry(tmp_path).manifest("n").task(1).parts["masks"].digest))
    blob.unlink()
    blob.mkdir()  # one of n's task blobs: unreadable
    fresh = ModelRepository(Registry(tmp_path))
    with caplog.at_level(logging.ERROR, logger="maskbank.serving"):
        fresh.refresh()
    assert [t.entry.id for t in fresh.get("n").out_of_service()] == [1] and fresh.get("m").generation == 1
    assert "model 'n': task 1 (perm-1) is out of service: blob sha256:" in messages(caplog)[-1]
    assert "cannot be read (Is a directory): check its permissions and the disk, or restore it" in messages(caplog)[-1]


def test_an_entry_without_a_generation_is_not_listed_as_a_model(tmp_path, capsys):
    """A stray file under models/ (or a first publish under way) is no model: the index leaves it out
    and `registry ls` lists the real models and mentions it, rather than failing on it."""
    from maskbank.cli import main

    train_model(tmp_path, "m", 1, TINY)
    (tmp_path / "models" / "NOTES").write_text("a person's notes")
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    assert [row[0] for row in repository.index()] == ["m"]
    assert main(["registry", "ls", "--registry", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| m | 1 | 1 | supsup |" in out
    assert "(no generation in 'NOTES' under models/: a first publish under way, or not a model)" in out
    assert main(["registry", "verify", "--registry", str(tmp_path)]) == 0
    assert "checked 1 generation(s) of 1 model(s)" in capsys.readouterr().out
    with pytest.raises(ModelNotFound, match=r"has no model 'NOTES' to load \(models: m\)$"):
        repository.load("NOTES")
    with pytest.raises(ModelNotFound, match=r"has no model 'typo' \(models: m\)$"):
        Registry(tmp_path).manifest("typo")


def test_a_model_being_loaded_is_unavailable_not_unknown(tmp_path):
    """Between an operator's load and its snapshot, requests were told the model is not served at all
    (NOT_FOUND, naming the --model list it is in): it is loading, so retry (UNAVAILABLE)."""
    from serving.errors import ModelUnavailable

    train_model(tmp_path, "m", 1, TINY)
    seen = []

    class Watched(ModelRepository):
        def refresh(self, models=None):
            if models == ["m"]:
                with pytest.raises(ModelUnavailable, match=r"model 'm' is being loaded \(RepositoryModelLoad\); retry"):
                    self.get("m")
                seen.append(models)
            return super().refresh(models)

    repository = Watched(Registry(tmp_path), only=["m"])
    with pytest.raises(ModelNotFound, match="model 'm' is not served yet: this server serves it .--model. once a loadable"):
        repository.get("m")
    repository.load("m")
    assert seen == [["m"]] and repository.get("m").generation == 1


def test_a_generation_that_cannot_be_loaded_is_logged_with_what_is_served_instead(tmp_path, caplog):
    """The log said 'keeping the previous one' for a model that had none."""
    train_model(tmp_path, "m", 1, TINY)
    first = tmp_path / "models" / "m" / "generations" / "0000000001.json"
    text = first.read_text()
    first.write_text(text[:50])
    repository = ModelRepository(Registry(tmp_path))
    with caplog.at_level(logging.ERROR, logger="maskbank.serving"):
        repository.refresh()
    assert "model 'm': generation 1 could not be loaded (not served until a loadable generation is published)" in caplog.text
    first.write_text(text)
    repository.refresh()
    train_model(tmp_path, "m", 2, TINY)
    (tmp_path / "models" / "m" / "generations" / "0000000002.json").write_text("{")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="maskbank.serving"):
        repository.refresh()
    assert "model 'm': generation 2 could not be loaded (still serving generation 1)" in caplog.text


def test_a_server_started_after_a_bad_publish_serves_the_newest_generation_that_loads(tmp_path, caplog):
    """A running server keeps serving generation 2 when generation 3 cannot be loaded; one started
    then served nothing (every replica restarted after a bad publish took the model down). It serves 2
    too, says why 3 is not served (index, an explicit load: an error, as in Triton), and serves 3
    once it loads."""
    train_model(tmp_path, "m", 3, TINY)
    newest = tmp_path / "models" / "m" / "generations" / "0000000003.json"
    text = newest.read_text()
    newest.write_text(text[:50])
    repository = ModelRepository(Registry(tmp_path))
    with caplog.at_level(logging.ERROR, logger="maskbank.serving"):
        repository.refresh()
    assert repository.get("m").generation == 2
    assert "model 'm': generation 3 could not be loaded (serving generation 2, the newest that loads)" in caplog.text
    (model, generation, state, reason), = repository.index()
    assert (model, generation, state) == ("m", 2, "READY") and reason.startswith("generation 3 could not be loaded: ")
    with pytest.raises(ModelUnavailable, match="model .m.: generation 3 could not be loaded: .*; generation 2 is "
                                               "served"):
        repository.load("m")
    assert repository.get("m").generation == 2
    repository.unload("m")
    with pytest.raises(ModelUnavailable, match="generation 3 could not be loaded: .*; generation 2 is served"):
        repository.load("m")  # asked for: the older generation is looked for again, and served
    assert repository.get("m").generation == 2
    newest.write_text(text)
    assert repository.load("m").generation == 3 and repository.index()[0] == ("m", 3, "READY", "")


def test_a_load_error_ends_when_the_registry_is_right_again(tmp_path):
    """A failure was only forgotten when a new generation was swapped in: a bad newest generation
    removed again (a backup restored), or one listing that failed for a moment, made every
    RepositoryModelLoad fail and the index say so for good."""
    train_model(tmp_path, "m", 2, TINY)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    bad = tmp_path / "models" / "m" / "generations" / "0000000003.json"
    collector = MaskbankCollector(repository, Statistics())
    failing = lambda: {tuple(s.labels.items()): s.value for family in collector.collect()  # noqa: E731
                       if family.name == "maskbank_model_load_failing" for s in family.samples}
    assert failing() == {(("model", "m"),): 0}
    bad.write_text("{")
    repository.refresh()
    assert repository.index()[0][3].startswith("generation 3 could not be loaded")
    assert failing() == {(("model", "m"),): 1}  # a replica stuck behind its registry, for alerts
    bad.unlink()
    repository.refresh()
    assert repository.index() == [("m", 2, "READY", "")] and repository.load("m").generation == 2
    assert failing() == {(("model", "m"),): 0}


def test_a_starting_server_looks_for_an_older_generation_once_per_newest(tmp_path, monkeypatch):
    """The fallback read up to 17 manifests on every poll while no generation of the model loaded."""
    train_model(tmp_path, "m", 3, TINY)
    for generation in (1, 2, 3):
        (tmp_path / "models" / "m" / "generations" / f"{generation:010d}.json").write_text("{")
    registry = Registry(tmp_path)
    manifest, read = registry.manifest, []
    monkeypatch.setattr(registry, "manifest", lambda model, generation=None: read.append(generation) or
                        manifest(model, generation))
    repository = ModelRepository(registry)
    repository.refresh()
    repository.refresh()
    assert read == [3, 2, 1, 3]  # the second poll tries the newest only
    assert repository.index()[0][2] == "UNAVAILABLE"


def test_the_fallback_covers_failures_that_are_not_maskbanks_own(tmp_path, monkeypatch):
    """A manifest crafted with a valid checksum can fail to load with a TypeError: a server started then
    served nothing while the running ones served the generation before."""
    train_model(tmp_path, "m", 3, TINY)
    load = Snapshot.load

    def crafted(registry, manifest, *args):
        if manifest.generation == 3:
            raise TypeError("crafted")
        return load(registry, manifest, *args)

    monkeypatch.setattr(Snapshot, "load", staticmethod(crafted))
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    assert repository.get("m").generation == 2
    assert repository.index() == [("m", 2, "READY", "generation 3 could not be loaded: TypeError: crafted")]


def _corrupt_mask(registry: Registry, task: int) -> tuple[Path, bytes]:
    """Damage the mask blob of `task` of model m; return its file and the good bytes to restore."""
    blob = Path(registry.blobs.describe(registry.manifest("m").task(task).parts["masks"].digest))
    good = blob.read_bytes()
    blob.write_bytes(b"corrupt")
    return blob, good


def test_a_task_that_failed_to_load_is_loaded_again_with_the_next_generation(tmp_path):
    """A task whose blob failed verification stayed out of service for the life of the process, even
    once the blob was restored and new generations were published (a new replica served it)."""
    blob, good = _corrupt_mask(train_model(tmp_path, "m", 1, TINY), 0)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    assert repository.get("m").tasks[0].error is not None
    blob.write_bytes(good)
    train_model(tmp_path, "m", 2, TINY)
    repository.refresh()
    assert [t.error for t in repository.get("m").tasks.values()] == [None, None]


def test_an_explicit_load_brings_a_restored_task_back_into_service(tmp_path, caplog):
    """The DATA_LOSS message says to restore the blob, and RepositoryModelLoad is 'load or refresh
    now', yet a load of the generation served kept the task out of service until a new generation
    or a restart."""
    blob, good = _corrupt_mask(train_model(tmp_path, "m", 2, TINY), 1)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    assert [t.entry.id for t in repository.get("m").out_of_service()] == [1]
    assert repository.refresh() == []  # a poll's retry: still corrupt
    blob.write_bytes(good)
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        loaded = repository.load("m")
    assert loaded.generation == 2 and loaded.out_of_service() == [] and repository.get("m") is loaded
    assert "model 'm': task 1 (perm-1) is back in service" in messages(caplog)
    assert repository.load("m") is loaded  # nothing out of service: nothing to load again


def test_polls_retry_a_task_out_of_service_quietly_at_growing_intervals(tmp_path, caplog, monkeypatch):
    """A missing blob may be one a copy has not brought yet (an unordered sync copies the manifest
    first): polls never retried it, so the task stayed out of service until a load or a restart."""
    monkeypatch.setattr(repository_module, "RETRY_FIRST_SECONDS", 0.4)
    blob, good = _corrupt_mask(train_model(tmp_path, "m", 2, TINY), 1)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    served = repository.get("m")
    assert repository.index() == [("m", 2, "READY", "task(s) 1 out of service (a blob missing or corrupt: ListTasks "
                                                    "says which; polls retry them, RepositoryModelLoad at once)")]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        assert repository.refresh() == []  # retried at once: still corrupt; the next retry in 0.4 s, then 0.8 s
        assert not messages(caplog)  # quietly: the task's error was logged when it was loaded
        blob.write_bytes(good)
        assert repository.refresh() == []  # not due yet
        time.sleep(0.5)
        (swapped,) = repository.refresh()
    assert swapped.generation == served.generation and swapped.out_of_service() == [] and repository.get("m") is swapped
    assert "model 'm': task 1 (perm-1) is back in service" in messages(caplog)
    assert repository.refresh() == [] and repository.index() == [("m", 2, "READY", "")]


def test_a_generation_replaced_by_another_manifest_is_loaded(tmp_path, caplog):
    """A model deleted and published again between two polls (or a registry swapped for another copy)
    with as many generations was never noticed: the server kept serving the old tasks, also after an
    explicit load, while a replica started later served the new ones."""
    train_model(tmp_path / "a", "m", 2, TINY)
    train_model(tmp_path / "b", "m", 2, {**TINY, "seed": 1})
    repository = ModelRepository(Registry(tmp_path / "a"))
    repository.refresh()
    before = repository.get("m")
    assert repository.refresh() == []  # the manifest is read once, then only looked at
    shutil.copytree(tmp_path / "b" / "blobs", tmp_path / "a" / "blobs", dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "a" / "models")
    shutil.copytree(tmp_path / "b" / "models", tmp_path / "a" / "models")
    with caplog.at_level(logging.WARNING, logger="maskbank.serving"):
        (swapped,) = repository.refresh()
    assert swapped.generation == before.generation and swapped.manifest == Registry(tmp_path / "b").manifest("m")
    assert ("model 'm': generation 2 in the registry is not the one served (the model was deleted and published "
            "again, or the registry replaced by another copy): loading it") in messages(caplog)
    assert repository.refresh() == [] and repository.load("m") is swapped


@pytest.mark.parametrize("lower", [False, True], ids=["same number", "lower number"])
@pytest.mark.parametrize("task_out_of_service", [False, True])
def test_a_replaced_generation_that_does_not_load_is_said_once_and_retried_at_growing_intervals(
        tmp_path, caplog, monkeypatch, lower, task_out_of_service):
    """A replacement whose blobs had not arrived (another manifest under the served number, or a lower
    newest generation) was warned about, and loaded again, on every poll; with a task out of service
    besides, the two retries shared one schedule and the replacement was never retried."""
    monkeypatch.setattr(repository_module, "RETRY_FIRST_SECONDS", 0.4)
    train_model(tmp_path / "a", "m", 2, TINY)
    train_model(tmp_path / "b", "m", 1 if lower else 2, {**TINY, "seed": 1})
    if task_out_of_service:
        _corrupt_mask(Registry(tmp_path / "a"), 1)
    repository = ModelRepository(Registry(tmp_path / "a"))
    repository.refresh()
    served = repository.get("m")
    assert len(served.out_of_service()) == task_out_of_service
    generations = Path("models") / "m" / "generations"
    shutil.rmtree(tmp_path / "a" / generations)  # before its blobs, as a sync may copy
    shutil.copytree(tmp_path / "b" / generations, tmp_path / "a" / generations)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        for _ in range(3):
            assert repository.refresh() == [] and repository.get("m") is served
        said = "below the 2 served" if lower else "is not the one served"
        assert sum(said in m for m in messages(caplog)) == 1
        assert sum("could not be loaded" in m for m in messages(caplog)) == 1 and repository.failing() == ["m"]
        shutil.copytree(tmp_path / "b" / "blobs", tmp_path / "a" / "blobs", dirs_exist_ok=True)
        time.sleep(0.5)
        (swapped,) = repository.refresh()
    assert swapped.manifest == Registry(tmp_path / "b").manifest("m") and repository.failing() == []


def test_a_load_that_fails_tells_the_listeners(tmp_path):
    """A failed explicit load changes what the server awaits (its readiness) without a swap: the health
    service, told by the listeners, said SERVING while ServerReady said not ready."""
    registry = train_model(tmp_path, "m", 1, TINY)
    repository = ModelRepository(registry, only=["m"])
    repository.refresh()
    repository.unload("m")
    assert repository.awaited() == []
    (backbone,) = registry.manifest("m").backbones.values()
    Path(registry.blobs.describe(backbone.blob.digest)).unlink()
    told = []
    repository.add_listener(lambda: told.append(repository.awaited()))
    with pytest.raises(ModelUnavailable):
        repository.load("m")
    assert told and told[-1] == ["m"]


def test_a_registry_over_http_is_followed_though_it_cannot_say_when_a_file_changed(tmp_path):
    """fsspec's HTTP has no `modified`: every poll after the first load failed ("cannot reach registry:
    NotImplementedError"), so a read-only mirror served over HTTP looked broken."""
    import functools
    import http.server
    import threading

    train_model(tmp_path, "m", 2, TINY)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as mirror:
        threading.Thread(target=mirror.serve_forever, daemon=True).start()
        repository = ModelRepository(Registry(f"http://127.0.0.1:{mirror.server_address[1]}"))
        (loaded,) = repository.refresh()
        assert repository.refresh() == [] and repository.refresh() == []
        assert repository.failing() == [] and repository.index() == [("m", 2, "READY", "")]
        assert repository.get("m") is loaded
        mirror.shutdown()


def test_a_generation_that_goes_backwards_is_a_warning(tmp_path, caplog):
    """Generations only grow; a registry whose newest is below the one served was replaced (a model
    deleted and published again, an older backup restored). Served, but said as a warning."""
    train_model(tmp_path / "a", "m", 2, TINY)
    repository = ModelRepository(Registry(tmp_path / "a"))
    repository.refresh()
    generations = tmp_path / "a" / "models" / "m" / "generations"
    (generations / "0000000002.json").unlink()
    with caplog.at_level(logging.WARNING, logger="maskbank.serving"):
        repository.refresh()
    assert repository.get("m").generation == 1
    assert ("model 'm': the registry's newest generation is 1, below the 2 served (the model was deleted and "
            "published again, or the registry restored from an older copy): loading it") in messages(caplog)


def test_the_index_answers_from_the_last_poll_without_reading_the_registry(tmp_path):
    """RepositoryIndex read the registry on every call: while an S3 registry stalled, each call held a
    server thread until the client's deadline, and a few of them froze every other non-inference
    call. It now answers from what the last poll found (as fresh as the poll interval): here the
    registry is gone, and the index still says what the poll saw."""
    root = tmp_path / "reg"
    train_model(root, "m", 1, TINY)
    train_model(root, "n", 1, TINY)
    repository = ModelRepository(Registry(root), only=["m"])
    assert repository.index()[0] == ("m", 0, "UNAVAILABLE", "not loaded yet")  # before any poll: read now
    repository.refresh()
    root.rename(tmp_path / "elsewhere")
    assert repository.index() == [
        ("m", 1, "READY", ""), ("n", 0, "UNAVAILABLE", "not among the models this server was started with (--model)")]


def test_unloading_a_model_frees_its_cached_weights_and_keeps_the_others(tmp_path, caplog):
    """With a cache bounded by a share of memory, an unloaded model's weights would otherwise stay
    until other tasks pushed them out."""
    for model in ("m", "n"):
        train_model(tmp_path, model, 2, TINY)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    x = torch.zeros(3, 64)
    for model in ("m", "n"):
        snapshot = repository.get(model)
        for task in snapshot.tasks.values():
            snapshot.logits(task, x)
    before = repository.cache.stats()
    assert before.entries == 4
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        repository.unload("m")
    after = repository.cache.stats()
    assert after.entries == 2 and after.bytes == before.bytes // 2 and after.evictions == 0
    assert f"unloaded model 'm' (2 cached entries, {before.bytes / 2e6:.1f} MB, freed)" in messages(caplog)
    snapshot = repository.get("n")
    snapshot.logits(snapshot.tasks[0], x)
    assert repository.cache.stats().hits == before.hits + 1  # n's entries were kept


def test_requests_still_running_on_an_unloaded_model_put_nothing_back(tmp_path, caplog):
    """They ran after the eviction, missed, rebuilt every task's weights (and the gradient modes' mask
    matrix, which an unloaded snapshot built lazily without being retired) and kept them, where
    nothing would evict them again: an unloaded model held all it had cached."""
    from serving.onnx_backend import OnnxRuntimeBackend
    from serving.task_inference import infer_task

    train_model(tmp_path, "m", 2, TINY)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    stale = repository.get("m")  # what requests queued before the unload hold
    x = torch.zeros(3, 64)
    stale.logits(stale.tasks[0], x)
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        repository.unload("m")
    assert "unloaded model 'm' (1 cached entries" in " ".join(messages(caplog))
    for task in stale.tasks.values():
        stale.logits(task, x)
        OnnxRuntimeBackend(threads=1).logits(stale, task, x)
    assert infer_task("oneshot", stale, x).mode == "oneshot"  # its mask stack built now, after the unload
    assert repository.cache.stats().entries == 0
    repository.load("m")
    served = repository.get("m")
    expected = served.logits(served.tasks[1], x)
    assert repository.cache.stats().entries == 1 and torch.equal(stale.logits(stale.tasks[1], x), expected)


@pytest.mark.parametrize("method, kept", [("supsup", 2), ("exssnet", 2), ("spg", 0)])
def test_a_new_generation_frees_the_cached_weights_it_no_longer_uses(tmp_path, caplog, method, kept):
    """SPG serves every task on the newest backbone version, so each task published made the weights
    cached for the version before dead; they stayed until other tasks pushed them out, which with a
    cache of a quarter of memory can be never. SupSup's and ExSSNeT's stay: each task keeps its own
    backbone version."""
    settings = {**TINY, "method": method, "method_config": {"epochs": 1}}
    train_model(tmp_path, "m", 2, settings)
    repository = ModelRepository(Registry(tmp_path))
    repository.refresh()
    x = torch.zeros(3, 64)
    for snapshot in [repository.get("m")]:
        for task in snapshot.tasks.values():
            snapshot.logits(task, x)
    assert repository.cache.stats().entries == 2
    train_model(tmp_path, "m", 3, settings)  # appends task 2
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        repository.refresh()
    assert repository.get("m").generation == 3 and repository.cache.stats().entries == kept
    assert any("no longer uses" in m for m in messages(caplog)) == (kept == 0)
    snapshot = repository.get("m")
    hits = repository.cache.stats().hits
    snapshot.logits(snapshot.tasks[0], x)
    assert repository.cache.stats().hits == hits + (kept > 0)


def test_a_task_out_of_service_tells_clients_how_its_blob_failed_not_where_it_lies(tmp_path, caplog):
    """Requests for a broken task got the registry's message: the server's path to the blob and restore
    advice. Bytes that hash right but do not decode were called a failed verification, and a codec this
    server does not know answered INVALID_ARGUMENT ("never retry"), both fixed here."""
    from registry import BlobRef, BlobUndecodable, InvalidArtifact

    registry = train_model(tmp_path, "m", 1, TINY)
    manifest = registry.manifest("m")
    first = manifest.tasks[0]
    codec = first.parts["masks"].codec
    junk = BlobRef(digest=registry.blobs.put(b"not a mask at all"), codec=codec, size=17)
    unknown = dataclasses.replace(first.parts["masks"], codec="future-codec/v9")
    broken = [dataclasses.replace(first, id=i, name=f"broken-{i}", parts={"masks": ref}) for i, ref in ((1, junk), (2, unknown))]
    registry.commit(manifest.next(tasks=(first, *broken)))
    with caplog.at_level(logging.ERROR, logger="maskbank.serving"):
        snapshot = Snapshot.load(registry, registry.manifest("m"), None, LRUCache(1 << 20))
    undecodable, unknown_codec = snapshot.tasks[1].error, snapshot.tasks[2].error
    assert isinstance(undecodable, BlobUndecodable) and str(undecodable) == (
        f"task 1 (broken-1) of model 'm' is out of service: its masks blob {junk.digest} cannot be decoded as {codec}; "
        "polls retry it, at growing intervals up to a minute")
    assert isinstance(unknown_codec, InvalidArtifact) and "cannot be used: Unknown codec 'future-codec/v9'" in str(unknown_codec)
    assert all(str(tmp_path) not in str(error) for error in (undecodable, unknown_codec))
    assert "cannot be decoded as" in messages(caplog)[0] and "header too large" in messages(caplog)[0]  # the details


def test_a_model_whose_manifest_lists_no_task_is_unavailable_and_says_why(tmp_path):
    """A manifest made by hand with no task: RepositoryIndex said UNAVAILABLE with no reason at all."""
    registry = train_model(tmp_path, "m", 1, TINY)
    registry.commit(dataclasses.replace(registry.manifest("m"), model="e", generation=1, tasks=()))
    repository = ModelRepository(registry)
    repository.refresh()
    assert repository.index()[0] == ("e", 1, "UNAVAILABLE", "its manifest lists no task")
