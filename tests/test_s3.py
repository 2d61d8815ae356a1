"""The registry on object storage: S3 (a real moto S3 server on loopback, reached through s3fs and
the standard AWS environment variables) and memory://. Publishing must stay a compare-and-swap
there too, and several servers must follow one shared registry."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import boto3
import numpy as np
import pytest
import torch
import tritonclient.grpc as triton
from moto.server import ThreadedMotoServer
from s3fs import S3FileSystem

from maskbank.cli import main
from maskbank.process import ServerProcess
from registry import BlobCorrupt, Manifest, PublishConflict, Registry, RegistryError, RegistryUnreachable
from serving import InferenceServer, ServerConfig
from trainer import get_stream

from .conftest import TINY, manifest_with, train_model, wait_for

BUCKET = "maskbank-test"
RACERS = 8


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on a free loopback port with one bucket. The AWS variables are set in
    os.environ (restored afterwards) so that botocore, and server subprocesses, find it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    werkzeug, level = logging.getLogger("werkzeug"), logging.getLogger("werkzeug").level
    werkzeug.setLevel(logging.WARNING)  # moto logs one line per request otherwise
    with pytest.MonkeyPatch.context() as env:
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}.items():
            env.setenv(name, value)
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
            env.delenv(name, raising=False)
        S3FileSystem.clear_instance_cache()  # cached instances would keep another endpoint
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        try:
            yield endpoint
        finally:
            S3FileSystem.clear_instance_cache()
            server.stop()
            werkzeug.setLevel(level)


@pytest.fixture
def s3_url(s3_endpoint) -> str:
    """A fresh, empty registry prefix in the bucket."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://maskbank-{uuid.uuid4().hex}"
    yield url
    registry = Registry(url)
    registry.storage.fs.rm(registry.storage.root, recursive=True)


def s3_key(url: str) -> str:
    """The object key that an s3://bucket/key URL names."""
    return url.removeprefix(f"s3://{BUCKET}/")


def race(attempts: list[Callable[[], object]]) -> list[object]:
    """Run the attempts in threads released together; each result is a return value or an exception."""
    results: list[object] = [None] * len(attempts)
    start = threading.Barrier(len(attempts))

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = attempts[i]()
        except Exception as error:  # noqa: BLE001 - the caller inspects it
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(attempts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def racing_commits(url: str) -> None:
    """RACERS publishers, each with its own Registry in its own thread, try to commit generation 2 at
    the same instant (concurrent requests to the server): exactly one wins and the registry holds its
    manifest."""
    registry = Registry(url)
    first = registry.commit(manifest_with(registry))
    candidates = [first.next(training={"publisher": i}) for i in range(RACERS)]
    results = race([lambda m=m: Registry(url).commit(m) for m in candidates])
    winners = [r for r in results if isinstance(r, Manifest)]
    assert len(winners) == 1, results
    assert all(isinstance(r, PublishConflict) for r in results if r is not winners[0]), results
    assert registry.generations("m") == [1, 2] and registry.manifest("m") == winners[0]


def racing_creates(url: str) -> None:
    """The primitive itself: of RACERS creators of one key exactly one gets True, and its bytes stay."""
    storage = Registry(url).storage
    results = race([lambda i=i: Registry(url).storage.create("race/key", b"%d" % i) for i in range(RACERS)])
    assert results.count(True) == 1 and results.count(False) == RACERS - 1, results
    assert storage.read("race/key") == b"%d" % results.index(True)


def round_trip_and_conflict(url: str) -> Registry:
    registry = Registry(url)
    assert registry.list_models() == [] and registry.generations("m") == []
    first = registry.commit(manifest_with(registry, tasks=2))
    assert registry.manifest("m") == first and registry.generations("m") == [1] and registry.list_models() == ["m"]
    second = registry.commit(first.next(tasks=manifest_with(registry, tasks=3).tasks))
    with pytest.raises(PublishConflict, match="registry is at generation 2; another publisher got there first"):
        registry.commit(second)
    assert registry.generations("m") == [1, 2] and registry.manifest("m", 1) == first and registry.manifest("m") == second
    return registry


# ---------------------------------------------------------------- S3



@pytest.mark.parametrize("url", ["s3://", "s3:///", "s3a://", "s3:///bucket/prefix"])
def test_a_url_without_a_bucket_says_so(url):
    """`s3://` read "cannot publish to s3:: publishing to s3::// is not supported" (the slash stripped
    off the scheme), and without an endpoint hung first."""
    with pytest.raises(RegistryError, match=f"registry {re.escape(url)} names no bucket: give s3://BUCKET"):
        Registry(url)

def test_s3_blob_round_trip_and_corruption_names_the_url(s3_url):
    registry = Registry(s3_url)
    ref = registry.put("tensors/v1", {"x": torch.arange(5.0)})
    assert registry.put("tensors/v1", {"x": torch.arange(5.0)}) == ref  # idempotent
    assert torch.equal(registry.load(ref)["x"], torch.arange(5.0))
    url = registry.blobs.describe(ref.digest)
    assert url == f"{s3_url}/blobs/sha256/{ref.digest[7:9]}/{ref.digest[7:]}"
    s3 = boto3.client("s3")
    assert s3.head_object(Bucket=BUCKET, Key=s3_key(url))["ContentLength"] == ref.size  # really on S3
    data = bytearray(s3.get_object(Bucket=BUCKET, Key=s3_key(url))["Body"].read())
    data[-1] ^= 0x01
    s3.put_object(Bucket=BUCKET, Key=s3_key(url), Body=bytes(data))
    with pytest.raises(BlobCorrupt) as info:
        registry.load(ref)
    assert ref.digest in str(info.value) and url in str(info.value)


def test_gc_leaves_a_folder_in_a_blobs_place_alone_and_says_so(s3_url, capsys):
    """A 'folder' (objects under a blob's key) made s3fs raise a bare IsADirectoryError: gc stopped
    with an empty message, before the other candidates."""
    registry = Registry(s3_url)
    registry.commit(manifest_with(registry))
    orphan = registry.put("tensors/v1", {"x": torch.arange(3.0)})
    folder = f"{registry.blobs.describe('sha256:' + 'ab' * 32)}/part"
    boto3.client("s3").put_object(Bucket=BUCKET, Key=s3_key(folder), Body=b"x")
    assert main(["registry", "gc", "--grace-seconds", "0", "--registry", s3_url]) == 1
    out = capsys.readouterr().out
    assert "deleted 1 unreferenced blob(s)" in out
    assert f"PROBLEM left alone: {folder.removesuffix('/part')}: a folder, not a file" in out
    assert not registry.storage.exists(registry.blobs.key(orphan.digest))
    assert main(["registry", "verify", "--registry", s3_url]) == 0  # it called the folder an unreferenced blob
    assert "1 file(s) or folder(s) under blobs/ that are no blob" in capsys.readouterr().out


def test_s3_manifest_commit_generations_and_conflict(s3_url):
    round_trip_and_conflict(s3_url)


def test_s3_create_never_overwrites(s3_url):
    storage = Registry(s3_url).storage
    assert storage.create("k", b"first") and not storage.create("k", b"second")
    assert storage.read("k") == b"first"
    storage.write("k", b"replaced")  # write, unlike create, replaces
    assert storage.read("k") == b"replaced" and storage.list_dir("") == ["k"] and storage.modified("k") > 0
    with pytest.raises(FileNotFoundError):
        storage.read("nope")


@pytest.mark.parametrize("location", ["s3", "folder"])
def test_a_storage_version_tells_a_same_size_rewrite_within_a_second(location, request, tmp_path):
    """A server tells a replaced manifest by its metadata: with size and modification time (two HEADs),
    a rewrite of the same size within S3's 1 s time resolution went unnoticed; the ETag is the content's.
    In a folder a write moves a new file in: a new inode."""
    storage = Registry(request.getfixturevalue("s3_url") if location == "s3" else tmp_path).storage
    storage.write("k", b"aaaa")
    first = storage.version("k")
    assert storage.version("k") == first
    storage.write("k", b"bbbb")
    assert storage.version("k") != first


def test_a_server_on_s3_notices_a_manifest_replaced_by_one_of_the_same_size_at_once(s3_url):
    """A model deleted and published again between two polls, its manifest of the same size: compared by
    size and modification time (S3's are whole seconds) the server went on serving the old tasks."""
    import dataclasses

    from serving.repository import ModelRepository

    registry = Registry(s3_url)
    served = registry.commit(manifest_with(registry))
    repository = ModelRepository(registry)
    repository.refresh()
    assert repository.refresh() == []
    renamed = dataclasses.replace(served, tasks=(dataclasses.replace(served.tasks[0], name="u0"),))
    key = registry.manifest_key("m", 1)
    assert len(renamed.to_json()) == len(registry.storage.read(key))
    registry.storage.write(key, renamed.to_json())
    (swapped,) = repository.refresh()
    assert swapped.tasks[0].entry.name == "u0"


def test_a_bucket_deleted_under_a_server_is_a_failed_poll_and_the_models_stay_served(s3_endpoint):
    """A deleted bucket lists no models: the poll said the models had gone, then that the registry 'can be
    read again', though no registry was there any more."""
    from serving.repository import ModelRepository

    bucket = f"vanishing-{uuid.uuid4().hex[:8]}"
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    registry = Registry(f"s3://{bucket}/reg")
    registry.commit(manifest_with(registry))
    repository = ModelRepository(registry)
    (served,) = repository.refresh()
    for listed in client.list_objects_v2(Bucket=bucket)["Contents"]:
        client.delete_object(Bucket=bucket, Key=listed["Key"])
    client.delete_bucket(Bucket=bucket)
    with pytest.raises(RegistryError, match=f"no registry at s3://{bucket}/reg: bucket '{bucket}' does not exist"):
        repository.refresh()
    assert repository.get("m") is served


def test_s3_listings_are_fresh_across_clients(s3_url):
    """A server polls with its own client: a generation that another process publishes must appear
    although this process has listed (and s3fs cached) the prefix before. (s3fs shares one client
    per process, so the other publisher here is plain boto3.)"""
    reader = Registry(s3_url)
    first = reader.commit(manifest_with(reader))
    assert reader.generations("m") == [1] and not reader.storage.exists("models/m/generations/0000000002.json")
    key = f"{s3_key(s3_url)}/models/m/generations/0000000002.json"
    boto3.client("s3").put_object(Bucket=BUCKET, Key=key, Body=first.next(training={"by": "other"}).to_json(),
                                  IfNoneMatch="*")
    assert reader.generations("m") == [1, 2] and reader.manifest("m").training == {"by": "other"}
    assert reader.storage.exists("models/m/generations/0000000002.json")


def test_s3_racing_publishers_exactly_one_wins(s3_url):
    racing_commits(s3_url)
    racing_creates(s3_url)


# ---------------------------------------------------------------- memory:// and unsupported backends


def test_memory_registry_round_trip_conflict_and_race(memory_url):
    registry = round_trip_and_conflict(memory_url)
    ref = registry.manifest("m").task(0).parts["masks"]
    key = registry.blobs.key(ref.digest)
    registry.storage.write(key, registry.storage.read(key)[:-1])
    with pytest.raises(BlobCorrupt, match=f"at {memory_url}/blobs/sha256/"):
        registry.load(ref)


def test_memory_version_without_etags_is_size_and_time(memory_url):
    """A store without ETags still versions a manifest by its metadata (a server reads a manifest on
    every poll only where the store cannot tell at all, as fsspec's HTTP)."""
    storage = Registry(memory_url).storage
    storage.write("k", b"aaaa")
    first = storage.version("k")
    assert storage.version("k") == first and first[0] == 4
    storage.write("k", b"longer")
    assert storage.version("k")[0] == 6


def test_memory_racing_publishers_exactly_one_wins(memory_url):
    racing_commits(memory_url)
    racing_creates(memory_url)


def test_backends_without_atomic_create_are_read_only(tmp_path):
    Registry(tmp_path).commit(manifest_with(Registry(tmp_path)))
    registry = Registry(f"local://{tmp_path}")  # fsspec's local filesystem: readable, no atomic create
    assert registry.manifest("m").generation == 1
    with pytest.raises(RegistryError, match=r"publishing to local:// is not supported.*s3://.*memory://"):
        registry.commit(registry.manifest("m").next())
    assert Registry(tmp_path).generations("m") == [1]


def test_a_registry_url_that_cannot_be_opened_or_reached_is_a_registry_error(s3_url, capsys):
    """An unknown scheme, a backend whose package is missing, an S3 store without credentials: each a
    RegistryError naming the registry (the CLI prints it), never a client library's traceback."""
    with pytest.raises(RegistryError, match=r"cannot open registry foo://bucket/x: Protocol not known: foo"):
        Registry("foo://bucket/x")
    with pytest.raises(RegistryError, match=r"cannot open registry gs://bucket/x: .*gcsfs"):
        Registry("gs://bucket/x")
    with pytest.MonkeyPatch.context() as env:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.delenv(name)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance metadata lookup either
        S3FileSystem.clear_instance_cache()
        try:
            assert main(["registry", "ls", "--registry", s3_url]) == 2
        finally:
            S3FileSystem.clear_instance_cache()
    assert (f"maskbank registry ls: error: cannot reach registry {s3_url}: NoCredentialsError: Unable to locate "
            "credentials") in capsys.readouterr().err


def test_a_bucket_that_does_not_exist_is_no_registry(s3_endpoint, capsys):
    """A mistyped bucket listed no models and verified OK, like a mistyped local path before; train
    failed with botocore's words only, not naming the registry."""
    url = "s3://no-such-bucket/reg"
    train = ["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "1", "--model", "m"]
    for command in (["registry", "ls"], ["registry", "verify"], ["registry", "gc"], ["report", "m"], train):
        assert main([*command, "--registry", url]) == 2
        assert f"error: no registry at {url}: bucket 'no-such-bucket' does not exist" in capsys.readouterr().err
    server = InferenceServer(ServerConfig(registry=url, port=0, metrics_port=-1))  # it served nothing, for ever
    with pytest.raises(RegistryError, match=f"no registry at {url}: bucket 'no-such-bucket' does not exist"):
        server.start()


def test_a_prefix_holding_other_things_or_an_object_is_no_registry(s3_url, capsys):
    """A mistyped prefix (one holding other objects, or naming an object) verified OK with 0 generations,
    where the same mistakes on a local path are errors."""
    boto3.client("s3").put_object(Bucket=BUCKET, Key=f"{s3_key(s3_url)}/notes.txt", Body=b"x")
    for url, problem in ((s3_url, "it holds other things and no models/ or blobs/ (is it the right prefix?)"),
                         (f"{s3_url}/notes.txt", "it is an object, not a prefix holding one (is it the right URL?)")):
        for command in (["registry", "ls"], ["registry", "verify"]):
            assert main([*command, "--registry", url]) == 2
            assert f"error: no registry at {url}: {problem}" in capsys.readouterr().err
    Registry(s3_url).commit(manifest_with(Registry(s3_url)))  # a registry beside other objects is one
    assert main(["registry", "verify", "--registry", s3_url]) == 0


@pytest.fixture
def stalled_endpoint(s3_endpoint, monkeypatch) -> Iterator[str]:
    """An S3 endpoint that accepts connections and never answers (a store that hangs, not one that
    refuses), with short timeouts so that a test waits seconds, not the defaults' minute."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)  # connections complete in the kernel's backlog; nobody reads them
    with silent, s3_at(monkeypatch, silent.getsockname()[1], MASKBANK_S3_READ_TIMEOUT="0.5"):
        yield f"s3://{BUCKET}/stalled"


@contextlib.contextmanager
def s3_at(monkeypatch, port: int, **variables: str) -> Iterator[None]:
    """S3 clients made meanwhile reach the endpoint on loopback `port` (one attempt per call), with
    `variables` set besides."""
    for name, value in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1", **variables}.items():
        monkeypatch.setenv(name, value)
    S3FileSystem.clear_instance_cache()
    try:
        yield
    finally:
        S3FileSystem.clear_instance_cache()


def test_a_stalled_store_is_an_error_naming_the_registry_within_its_timeouts(stalled_endpoint, capsys):
    """With botocore's defaults (60 s per read, 5 attempts) and s3fs's 5 retries around them, a read of a
    store that hung took many minutes and held a server's registry poll meanwhile, unlogged."""
    began = time.monotonic()
    with pytest.raises(RegistryUnreachable, match=rf"cannot reach registry {stalled_endpoint}: ReadTimeoutError: "):
        Registry(stalled_endpoint).list_models()
    assert time.monotonic() - began < 30
    assert main(["registry", "ls", "--registry", stalled_endpoint]) == 2
    assert f"maskbank registry ls: error: cannot reach registry {stalled_endpoint}: ReadTimeoutError" in capsys.readouterr().err


@pytest.fixture
def refusing_endpoint(s3_endpoint, monkeypatch, request) -> Iterator[str]:
    """An S3 endpoint answering every request with the S3 error `request.param` (status, code)."""
    import functools
    import http.server
    import threading

    status, code = request.param

    class Refusing(http.server.BaseHTTPRequestHandler):
        def answer(self):
            body = f"<Error><Code>{code}</Code><Message>{code} from the test</Message></Error>".encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = answer

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refusing) as endpoint:
        threading.Thread(target=functools.partial(endpoint.serve_forever, 0.05), daemon=True).start()
        try:
            with s3_at(monkeypatch, endpoint.server_address[1]):
                yield f"s3://{BUCKET}/refused"
        finally:
            endpoint.shutdown()


@pytest.mark.parametrize("refusing_endpoint, said", [
    ((403, "InvalidAccessKeyId"), "PermissionError: .*: the store refused these credentials, or they lack permission"),
    ((503, "SlowDown"), "OSError: "),
], indirect=["refusing_endpoint"], ids=["credentials refused", "throttled"])
def test_a_store_refusing_credentials_or_throttling_is_unreachable_not_a_damaged_file(refusing_endpoint, said, capsys):
    """s3fs turns a 403 into PermissionError and a 503 SlowDown into OSError(EBUSY): commands printed a bare
    'Forbidden' with the status of a corrupt registry, and a throttled blob read as a damaged one (a
    server answered DATA_LOSS for it, and the log said to restore a backup). A 403 on one object stays that
    object's problem (verify names it; the rest is checked)."""
    storage = Registry(refusing_endpoint).storage
    with pytest.raises(RegistryUnreachable, match=rf"cannot reach registry {refusing_endpoint}: {said}"):
        storage.list_dir("models")
    if said.startswith("OSError"):
        with pytest.raises(RegistryUnreachable, match=rf"cannot reach registry {refusing_endpoint}: {said}"):
            storage.read("models/m/generations/0000000001.json")
    assert main(["registry", "ls", "--registry", refusing_endpoint]) == 2
    assert f"maskbank registry ls: error: cannot reach registry {refusing_endpoint}: " in capsys.readouterr().err


def test_a_permission_refused_on_one_object_is_that_objects_problem(memory_url, monkeypatch, capsys):
    """A 403 on one blob (its KMS key, a policy on its prefix) aborted verify as if the registry could not be
    reached; it is one unreadable blob, named with the task using it, and the rest is checked."""
    registry = Registry(memory_url)
    registry.commit(manifest_with(registry))
    refused = registry.blobs.key(registry.manifest("m").task(0).parts["masks"].digest)
    fs, cat_file = registry.storage.fs, registry.storage.fs.cat_file
    monkeypatch.setattr(fs, "cat_file", lambda path, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Forbidden"))
                        if path.endswith(refused) else cat_file(path, *a, **k))
    assert main(["registry", "verify", "--registry", memory_url]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM (unreadable)" in out and "used by model 'm' task 0 (t0) part masks" in out


@pytest.mark.parametrize("variable, value, message", [
    ("MASKBANK_S3_READ_TIMEOUT", "soon", "MASKBANK_S3_READ_TIMEOUT must be a number of seconds, got 'soon'"),
    ("MASKBANK_S3_CONNECT_TIMEOUT", "0", "MASKBANK_S3_CONNECT_TIMEOUT must be a positive number of seconds, got '0'"),
    ("AWS_MAX_ATTEMPTS", "0", "AWS_MAX_ATTEMPTS must be a whole number of attempts >= 1, got '0'"),
])
def test_s3_timeouts_from_the_environment_are_checked(s3_url, monkeypatch, variable, value, message):
    monkeypatch.setenv(variable, value)
    with pytest.raises(RegistryError, match=re.escape(message)):
        Registry(s3_url)


def test_an_s3_prefix_with_nothing_under_it_is_no_registry_until_the_first_publish(s3_url, capsys):
    assert main(["registry", "verify", "--registry", s3_url]) == 2
    assert f"no registry at {s3_url}: nothing is stored under it" in capsys.readouterr().err
    Registry(s3_url).put("tensors/v1", {})  # a first publish's blob, before its manifest: a registry now
    assert main(["registry", "verify", "--registry", s3_url]) == 1
    assert "no manifest, yet 1 blob(s)" in capsys.readouterr().out


def test_library_info_logs_stay_out_of_command_output(s3_url):
    """Every S3 command printed botocore's INFO lines ('Found credentials in environment variables')."""
    import subprocess
    import sys

    Registry(s3_url).put("tensors/v1", {})
    done = subprocess.run([sys.executable, "-m", "maskbank", "registry", "ls", "--registry", s3_url, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout) == [] and "INFO" not in done.stderr, done.stderr


# ---------------------------------------------------------------- two servers following one S3 registry


def logits(client: triton.InferenceServerClient, task: int) -> np.ndarray:
    x = get_stream("permuted-digits").task(task).x_test.numpy()[:32]
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("m", [inp], parameters={"task_id": task}).as_numpy("logits")


@pytest.mark.slow
def test_two_servers_follow_one_s3_registry(s3_url):
    train_model(s3_url, "m", 2, TINY)
    with ServerProcess(s3_url, "--poll-interval", "0.2") as one, ServerProcess(s3_url, "--poll-interval", "0.2") as two:
        clients = [triton.InferenceServerClient(server.url) for server in (one, two)]
        for client in clients:
            wait_for(lambda: client.is_model_ready("m"), what="the model to be ready")
            assert client.get_model_metadata("m").versions == ["2"]
        before = [logits(client, 0) for client in clients]
        assert np.array_equal(*before)
        train_model(s3_url, "m", 3, TINY)  # append a task while both serve
        for client in clients:
            wait_for(lambda: client.get_model_metadata("m").versions == ["3"], what="a server to load generation 3")
        for task in (0, 2):
            assert np.array_equal(logits(clients[0], task), logits(clients[1], task))
        assert np.array_equal(logits(clients[0], 0), before[0])  # appending did not change task 0
        for client in clients:
            client.close()


class _StallingProxy:
    """An HTTP proxy on loopback in front of the moto server that, while `stalling` is set, holds GET
    requests for blobs unanswered until the client gives up: a store whose blob reads hang while its
    listings and manifests answer (what a proxy, a throttled prefix or a failing disk behind S3 does)."""

    def __init__(self, upstream: str):
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.stalling = threading.Event()
        self.released = threading.Event()
        host, port = upstream.removeprefix("http://").rsplit(":", 1)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
                if self.command == "GET" and "/blobs/" in self.path and proxy.stalling.is_set():
                    proxy.released.wait(30)  # the client's read timeout ends it first
                    self.close_connection = True
                    return
                connection = http.client.HTTPConnection(host, int(port), timeout=30)
                connection.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = connection.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                connection.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


def test_a_blob_read_that_hangs_during_a_hot_add_fails_that_load_and_the_next_poll_serves_it(
        s3_endpoint, s3_url, monkeypatch, caplog):
    """The new task's blob read stalls: the load fails as a whole (the previous generation serves on, no
    task is taken out of service), and once the store answers the next poll serves the new generation."""
    from serving.repository import ModelRepository

    proxy = _StallingProxy(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("MASKBANK_S3_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    S3FileSystem.clear_instance_cache()
    try:
        train_model(s3_url, "m", 1, TINY)
        repository = ModelRepository(Registry(s3_url))
        repository.refresh()
        train_model(s3_url, "m", 2, TINY)  # published; the server has not polled yet
        proxy.stalling.set()
        with caplog.at_level(logging.INFO, logger="maskbank.serving"):
            began = time.monotonic()
            assert repository.refresh() == []
        assert time.monotonic() - began < 20
        served = repository.get("m")
        assert served.generation == 1 and not served.out_of_service()
        failed = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(failed) == 1 and "generation 2 could not be loaded (still serving generation 1)" in failed[0]
        assert f"cannot reach registry {s3_url}: ReadTimeoutError" in failed[0]
        proxy.stalling.clear()
        assert [s.generation for s in repository.refresh()] == [2]
        served = repository.get("m")
        assert served.logits(served.tasks[1], get_stream("permuted-digits").task(1).x_test[:4]).shape == (4, 10)
        assert not served.out_of_service()
    finally:
        proxy.close()
        S3FileSystem.clear_instance_cache()
