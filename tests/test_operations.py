"""Operating the server: Prometheus metrics, bearer-token auth of the admin calls, TLS, message
size limits, JSON logs and the flags around them. Real `maskbank serve` processes on loopback,
queried with the stock tritonclient; a few checks of the pieces in-process."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from maskbank.__main__ import SERVE_GRPC_EXPERIMENTS
from maskbank.cli import byte_size, main
from maskbank.process import ServerProcess
from serving import InferenceServer, ServerConfig
from serving._proto import pb, pb_grpc
from serving.auth import ADMIN_METHODS, AdminAuthInterceptor
from serving.logs import JsonFormatter
from serving.memory import host_memory

from .conftest import TINY, held_server, scrape, train_model, wait_for

TOKEN = "s3cret-token"
MAX_BYTES = 100_000  # the request below of 4 rows is ~1 KB; one of 500 rows is ~128 KB
X = np.random.default_rng(0).random((4, 64), dtype=np.float32)
LOAD = "/inference.GRPCInferenceService/RepositoryModelLoad"
UNLOAD = "/inference.GRPCInferenceService/RepositoryModelUnload"


def request(x: np.ndarray = X):
    inp = triton.InferInput("input", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def bearer(token: str) -> dict:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key, made now (none is committed)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@dataclass
class Served:
    process: ServerProcess
    client: triton.InferenceServerClient


@pytest.fixture(scope="module")
def servers(tmp_path_factory, certificate) -> dict[str, Served]:
    """Two servers of one registry:
    "ops": admin token from MASKBANK_ADMIN_TOKEN (with a secret file's trailing newline), a small message limit,
    JSON logs, metrics on a free port;
    "tls": TLS with the self-signed certificate, no admin token configured, metrics off.
    Servers follow the registry, so the model is trained while they start (the file's time budget is tight)."""
    root = tmp_path_factory.mktemp("registry")
    cert, key = certificate
    started: list[ServerProcess] = []
    with ThreadPoolExecutor(1) as pool:
        trained = pool.submit(train_model, root, "a", 2, TINY)
        try:
            with pytest.MonkeyPatch.context() as env:
                env.setenv("MASKBANK_ADMIN_TOKEN", TOKEN + "\n")  # as read from a secret file: clients send TOKEN
                started.append(ServerProcess(
                    root, "--poll-interval", "0.2", "--max-message-bytes", str(MAX_BYTES), "--log-format", "json",
                    "--metrics-port", "0", "--grace-seconds", "2").start())
            with pytest.MonkeyPatch.context() as env:
                env.delenv("MASKBANK_ADMIN_TOKEN", raising=False)
                started.append(ServerProcess(
                    root, "--poll-interval", "0.2", "--tls-cert", str(cert), "--tls-key", str(key),
                    "--metrics-port", "-1").start())
            trained.result()
            ops, tls = started
            served = {"ops": Served(ops, triton.InferenceServerClient(ops.url)),
                      "tls": Served(tls, triton.InferenceServerClient(tls.url, ssl=True, root_certificates=str(cert)))}
            for name, s in served.items():
                wait_for(lambda c=s.client: c.is_model_ready("a") and c.get_model_metadata("a").versions == ["2"],
                         what=f"model a at generation 2 on the {name} server")
            yield served
            for s in served.values():
                s.client.close()
        finally:
            codes = [process.stop() for process in started]
    assert codes == [0] * len(started), "\n".join(line for p in started for line in p.output)


@pytest.fixture
def ops(servers) -> tuple[ServerProcess, triton.InferenceServerClient]:
    return servers["ops"].process, servers["ops"].client


@pytest.fixture
def tls(servers) -> tuple[ServerProcess, triton.InferenceServerClient]:
    return servers["tls"].process, servers["tls"].client


# --- real servers -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_metrics_count_inferences_failures_cache_and_generation(ops):
    process, client = ops
    labels = (("model", "a"), ("version", "2"))
    before = scrape(process)
    for task in (0, 0, 1):  # inference needs no token
        client.infer("a", request(), parameters={"task_id": task})
    for model, parameters in (("a", {"task_id": 9}), ("nope", {"task_id": 0})):
        with pytest.raises(InferenceServerException):
            client.infer(model, request(), parameters=parameters)
    after = scrape(process)

    def grew(name, key=labels):
        return after[(name, key)] - before.get((name, key), 0)

    assert grew("nv_inference_request_success") == 3
    assert grew("nv_inference_request_failure") == 1  # the unknown model is not a label ...
    assert grew("maskbank_unserved_model_request_failure_total", ()) == 1  # ... but counted here
    assert not any(dict(key).get("model") == "nope" for _, key in after)
    assert grew("nv_inference_count") == 3 * len(X) and grew("nv_inference_exec_count") == 3
    for name in ("nv_inference_request_duration_us", "nv_inference_compute_infer_duration_us"):
        assert grew(name) > 0
    assert ("nv_inference_queue_duration_us", labels) in after
    assert grew("maskbank_cache_hits_total", ()) + grew("maskbank_cache_misses_total", ()) == 3
    assert after[("maskbank_cache_hits_total", ())] >= 1 and after[("maskbank_cache_evictions_total", ())] == 0
    assert after[("maskbank_cache_rejections_total", ())] == 0
    assert after[("maskbank_cache_entries", ())] == 2 and after[("maskbank_cache_bytes", ())] > 0
    assert after[("maskbank_cache_capacity_bytes", ())] == host_memory().bytes // 4  # the default: 25% of memory
    assert any("weight cache: up to" in line and "(25% of" in line for line in process.output)
    assert after[("maskbank_model_generation", (("model", "a"),))] == 2
    assert after[("maskbank_model_tasks", (("model", "a"),))] == 2
    assert after[("maskbank_model_tasks_out_of_service", (("model", "a"),))] == 0
    assert after[("maskbank_server_info", (("backend", "pytorch"), ("device", "cpu")))] == 1
    assert not [name for name, _ in after if name.startswith("maskbank_gpu_")]  # only a server on a GPU has them
    assert after[("maskbank_model_requests_pending", (("model", "a"),))] == 0
    assert after[("maskbank_model_requests_refused_total", (("model", "a"),))] == 0
    assert after[("maskbank_model_requests_cancelled_total", (("model", "a"),))] == 0


@pytest.mark.slow
def test_admin_calls_need_the_bearer_token(ops):
    _, client = ops
    for headers, says in ((None, "send the metadata header 'authorization: Bearer <token>'"),
                          (bearer("wrong"), "not the one this server was started with"),
                          ({"authorization": TOKEN}, "must be 'Bearer <token>'")):
        for call in (client.unload_model, client.load_model):
            with pytest.raises(InferenceServerException) as info:
                call("a", headers=headers)
            assert info.value.status() == "StatusCode.UNAUTHENTICATED" and says in info.value.message()
            assert TOKEN not in info.value.message()
    assert client.is_model_ready("a")  # nothing was unloaded
    client.unload_model("a", headers=bearer(TOKEN))
    assert not client.is_model_ready("a")
    client.load_model("a", headers={"authorization": f"bearer {TOKEN}"})  # the scheme is case-insensitive
    assert client.is_model_ready("a")
    assert sum("has whitespace around it, such as the newline of a secret file" in line for line in ops[0].output) == 1
    assert client.infer("a", request(), parameters={"task_id": 1}).as_numpy("task_id").tolist() == [1] * len(X)


@pytest.mark.slow
def test_an_oversize_request_is_resource_exhausted_and_the_server_keeps_serving(ops):
    _, client = ops
    big = np.zeros((500, 64), np.float32)  # 128 000 bytes of tensor > --max-message-bytes 100000
    with pytest.raises(InferenceServerException) as info:
        client.infer("a", request(big), parameters={"task_id": 0})
    assert info.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert re.search(r"larger than max \(\d+ vs\. 100000\)", info.value.message()), info.value.message()
    assert client.infer("a", request(), parameters={"task_id": 0}).as_numpy("logits").shape == (len(X), 10)


@pytest.mark.slow
def test_logs_are_one_json_object_per_line(ops):
    process, client = ops
    with pytest.raises(InferenceServerException):
        client.unload_model("a")  # logs a refusal with extra fields
    wait_for(lambda: any("refused" in line for line in process.output), timeout=10, what="the refusal log")
    lines = [line for line in list(process.output) if not line.startswith("maskbank serving ")]
    records = [json.loads(line) for line in lines]  # every other line is JSON
    assert records and all(isinstance(r, dict) and {"time", "level", "logger", "message"} <= set(r) for r in records)
    limits = next(r for r in records if r["message"].startswith("limits: "))
    assert limits["max_message_bytes"] == MAX_BYTES and limits["max_queue_size"] == 0 and limits["instances"] == 2
    runtime = next(r for r in records if r["message"].startswith("gRPC "))
    assert runtime["grpc_version"] == grpc.__version__
    assert runtime["grpc_experiments"] == os.environ.get("GRPC_EXPERIMENTS", SERVE_GRPC_EXPERIMENTS)
    assert runtime["message"].endswith(f"GRPC_EXPERIMENTS={runtime['grpc_experiments']}" if runtime["grpc_experiments"]
                                       else "gRPC's defaults")
    listening = next(r for r in records if r["message"].startswith("listening on"))
    assert listening["port"] == process.port and listening["tls"] is False and listening["metrics_port"] > 0
    refusal = next(r for r in records if r["message"].startswith("refused"))
    assert refusal["level"] == "WARNING" and refusal["method"] == UNLOAD
    assert refusal["peer"].startswith("ipv4:127.0.0.1:")


@pytest.mark.slow
def test_tls_serves_a_verified_client_refuses_plaintext_and_admin_calls_without_a_token(tls, certificate):
    process, client = tls
    startup = next(line for line in process.output if line.startswith("maskbank serving "))
    assert "TLS" in startup and "metrics off" in startup
    assert client.infer("a", request(), parameters={"task_id": 0}).as_numpy("task_id").tolist() == [0] * len(X)
    plaintext = triton.InferenceServerClient(process.url)
    with pytest.raises(InferenceServerException) as info:
        plaintext.is_server_live()
    assert info.value.status() == "StatusCode.UNAVAILABLE"
    plaintext.close()
    time.sleep(0.5)  # gRPC's own line for the failed handshake came at once, plain text beside the server's logs
    assert not any("Handshake failed" in line for line in process.output)
    with pytest.raises(InferenceServerException) as info:
        client.unload_model("a", headers=bearer("anything"))
    assert info.value.status() == "StatusCode.UNAUTHENTICATED"
    assert "started without an admin token" in info.value.message() and "--admin-token" in info.value.message()
    assert client.is_model_ready("a")


# --- in-process ---------------------------------------------------------------------------------------------------

def test_serve_refuses_half_a_tls_configuration(tmp_path, certificate, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--registry", str(tmp_path), "--port", "0", "--tls-cert", str(certificate[0])])
    assert stopped.value.code == 2
    assert "maskbank serve: error: --tls-cert was given without --tls-key" in capsys.readouterr().err


def test_a_busy_metrics_port_is_a_clear_error(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = InferenceServer(ServerConfig(registry=str(tmp_path), port=0, metrics_port=port))
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port} .*--metrics-port"):
            server.start()
        wait_for(lambda: not server._loop.is_running(), 10, "the failed server's event loop to stop")
        server.repository.close()


def test_a_port_another_server_serves_is_a_clear_error_not_a_shared_port(tmp_path):
    """gRPC's default (SO_REUSEPORT on Linux) would let a second server bind the port of a running one
    and take a share of its connections; maskbank refuses it, as for a port any program holds. It does
    so before loading any model (it loaded the whole registry first, minutes for a large one)."""
    train_model(tmp_path, "m", 1, TINY)
    first = InferenceServer(ServerConfig(registry=str(tmp_path), port=0, metrics_port=-1))
    first.start()
    try:
        second = InferenceServer(ServerConfig(registry=str(tmp_path), port=first.port, metrics_port=-1))
        with pytest.raises(OSError, match=f"cannot listen on 127.0.0.1:{first.port} \\(the port is taken: pick another --port"):
            second.start()
        assert second.repository.models() == [] and first.repository.models() == ["m"]
        wait_for(lambda: not second._loop.is_running(), 10, "the failed server's event loop to stop")
        second.repository.close()
    finally:
        first.stop()


@pytest.mark.parametrize("host, problem", [
    ("bogus.invalid", "--host bogus.invalid does not resolve: "),
    ("192.0.2.1", "192.0.2.1 is not an address of this machine: give one of its addresses, or 0.0.0.0 for all"),
])
def test_a_host_the_server_cannot_listen_on_is_named_with_why(tmp_path, host, problem, capfd):
    """Both read "the port is taken, or the address is not one of this machine's", after a core log
    line of gRPC's own; a name that does not resolve is no port problem. (192.0.2.1: TEST-NET-1.)"""
    server = InferenceServer(ServerConfig(registry=str(tmp_path), host=host, port=8001, metrics_port=-1))
    with pytest.raises(OSError, match=re.escape(f"cannot listen on {host}:8001 ({problem}")):
        server.start()
    assert "add_port" not in capfd.readouterr().err  # gRPC never tried


def test_connections_are_closed_after_max_connection_age_and_clients_carry_on(tmp_path):
    """--max-connection-age 0.5: the server sends GOAWAY to every connection after half a second;
    a client calling all along reconnects by itself (several READY -> IDLE cycles) and no call fails."""
    train_model(tmp_path, "m", 1, TINY)
    server = InferenceServer(ServerConfig(registry=str(tmp_path), port=0, metrics_port=-1, max_connection_age=0.5,
                                          grace_seconds=1))
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            states: list[grpc.ChannelConnectivity] = []
            channel.subscribe(states.append, try_to_connect=True)
            stub, began, calls = pb_grpc.GRPCInferenceServiceStub(channel), time.monotonic(), 0
            while time.monotonic() - began < 2.5:
                assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
                calls += 1
                time.sleep(0.02)
            client = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
            assert client.infer("m", request(), parameters={"task_id": 0}).as_numpy("logits").shape == (4, 10)
        closed = sum(a == grpc.ChannelConnectivity.READY and b == grpc.ChannelConnectivity.IDLE
                     for a, b in zip(states, states[1:]))
        assert closed >= 2 and calls > 50, (closed, calls, states)
    finally:
        server.stop()


def test_max_concurrent_streams_bounds_the_calls_a_connection_has_in_the_server(tmp_path):
    """--max-concurrent-streams 2, every compute thread held: of 6 task-inference calls sent at once on one
    connection the server holds 2; the others wait at the client or are refused UNAVAILABLE (clients
    differ), never reaching it. Once the threads are free every call is answered or refused, nothing else."""
    with held_server(tmp_path, max_concurrent_streams=2) as (server, releases):
        pending = ("maskbank_model_requests_pending", (("model", "m"),))
        message = pb.ModelInferRequest(model_name="m", raw_input_contents=[X.tobytes()])  # no task: on the pool
        message.inputs.add(name="input", datatype="FP32", shape=list(X.shape))
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            calls = [pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer.future(message, timeout=30) for _ in range(6)]
            wait_for(lambda: scrape(server)[pending] == 2, 10, "two calls in the server")
            time.sleep(0.3)
            assert scrape(server)[pending] == 2 and server.servicer.compute.queued == 2
            for release in releases:
                release.set()
            codes = [call.code() if call.exception() else grpc.StatusCode.OK for call in calls]
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE} and codes.count(grpc.StatusCode.OK) >= 2


def test_config_checks_tls_files_and_limits(tmp_path, certificate):
    cert, key = certificate
    ServerConfig(registry="r", tls_cert=str(cert), tls_key=str(key))
    with pytest.raises(ValueError, match="--tls-key was given without --tls-cert"):
        ServerConfig(registry="r", tls_key=str(key))
    with pytest.raises(ValueError, match="--max-connection-age must be from 0 .never. to 2147483 seconds, got -1"):
        ServerConfig(registry="r", max_connection_age=-1)
    with pytest.raises(ValueError, match="--max-concurrent-streams must be from 0 .gRPC's default. to 2147483647, got -1"):
        ServerConfig(registry="r", max_concurrent_streams=-1)
    with pytest.raises(ValueError, match="--model: invalid model name '../x': use 1-128 letters"):
        ServerConfig(registry="r", models=["a", "../x"])
    (tmp_path / "other.pem").write_bytes(b"not a key")
    for bad_key in (tmp_path / "other.pem", tmp_path / "missing.pem", cert):
        with pytest.raises(ValueError, match=re.escape(f"cannot use --tls-cert {cert} with --tls-key {bad_key}")):
            ServerConfig(registry="r", tls_cert=str(cert), tls_key=str(bad_key))
    for limit in (0, 64, 4095, 2**31):  # a unit's hint only where one may have been left off, not for 3GiB
        hint = " (a number without a unit is bytes: 16MiB, not 16)" if limit < 4096 else ""
        with pytest.raises(ValueError, match=r"--max-message-bytes must be from 4096 \(4KiB\) to 2147483647 .* got "
                                             f"{limit}{re.escape(hint)}$"):
            ServerConfig(registry="r", max_message_bytes=limit)
    with pytest.raises(ValueError, match="--grace-seconds"):
        ServerConfig(registry="r", grace_seconds=-1)
    with pytest.raises(ValueError, match=r"--threads must be from 0 \(torch's and ONNX Runtime's own choice\) to 1024, got 5000"):
        ServerConfig(registry="r", torch_threads=5000)
    with pytest.raises(ValueError, match=r"--admin-token \(or MASKBANK_ADMIN_TOKEN\) contains whitespace"):
        ServerConfig(registry="r", admin_token="two words")
    assert ServerConfig(registry="r", admin_token=" t0ken\n").bearer_token == "t0ken"
    assert ServerConfig(registry="r", admin_token="").bearer_token is None
    with pytest.raises(ValueError, match=r"--admin-token \(or MASKBANK_ADMIN_TOKEN\) is only whitespace"):
        ServerConfig(registry="r", admin_token="   \n")  # it disabled admin calls, with two contradicting log lines
    for port in (-1, 65536, 84000):
        with pytest.raises(ValueError, match=rf"--port must be from 0 \(a free port\) to 65535, got {port}"):
            ServerConfig(registry="r", port=port)  # gRPC bound 84000 mod 65536, a port nobody asked for
    with pytest.raises(ValueError, match=r"--metrics-port must be at most 65535 .* got 70001"):
        ServerConfig(registry="r", metrics_port=70001)  # an OverflowError traceback
    for field, flag, value in (("instances", "--instances", 0), ("workers", "--workers", 0),
                               ("max_batch_size", "--max-batch-size", 0), ("cache_bytes", "--cache-bytes", -1),
                               ("max_queue_delay_us", "--max-queue-delay-us", -5)):
        with pytest.raises(ValueError, match=f"{flag} must be at least"):
            ServerConfig(registry="r", **{field: value})
    for field, flag, value in (("max_batch_size", "--max-batch-size", 2**31), ("instances", "--instances", 2**31),
                               ("max_queue_size", "--max-queue-size", 2**32),
                               ("default_timeout_us", "--default-timeout-us", 2**64),
                               ("priority_levels", "--priority-levels", 1001)):  # ModelConfig was INTERNAL for ever
        with pytest.raises(ValueError, match=f"{flag} must be at most {value - 1:,}, got {value:,}"):
            ServerConfig(registry="r", **{field: value})
    with pytest.raises(ValueError, match=r"--max-queue-delay-us must be at most 1,000,000 \(1 s\), got 100,000,000,000,000"):
        ServerConfig(registry="r", max_queue_delay_us=10**14)  # every task-given request waited until its deadline
    for poll in (0, float("nan"), 1e-6, float("inf"), 1e10):  # inf: the polls stopped with an OverflowError traceback
        with pytest.raises(ValueError, match=r"--poll-interval must be from 0.01 to 86400 seconds \(a day\)"):
            ServerConfig(registry="r", poll_interval=poll)
    with pytest.raises(ValueError, match=r"--threads must be from 0 \(torch's and ONNX Runtime's own choice\) to 1024, got -1"):
        ServerConfig(registry="r", torch_threads=-1)  # torch.set_num_threads raised a RuntimeError traceback


def test_serve_takes_sizes_with_units_and_explains_a_bad_one(capsys):
    assert [byte_size(t) for t in ("268435456", "256MiB", "1.5GiB", "64M", "2kb", "4Gi", "1TiB", "2T")] == [
        268435456, 256 << 20, 3 << 29, 64_000_000, 2000, 4 << 30, 1 << 40, 2 * 10**12]  # Gi: as Kubernetes writes it
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--registry", "r", "--cache-bytes", "lots"])
    assert stopped.value.code == 2
    assert ("argument --cache-bytes: 'lots' is not a size in bytes (examples: 268435456, 256MiB, 1.5GiB, 4Gi, 64M), nor a "
            "share of memory (like 25%)") in capsys.readouterr().err
    for share in ("0%", "250%", "many%", "٢٥%"):  # the last: Arabic-Indic digits, which float() takes
        with pytest.raises(SystemExit):
            main(["serve", "--registry", "r", "--cache-bytes", share])
        assert (f"argument --cache-bytes: '{share}' is not a share of memory above 0%, up to 100% (like 25%)"
                in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["serve", "--registry", "r", "--cache-bytes", "9" * 400])
    assert f"argument --cache-bytes: '{'9' * 400}' is too large a size in bytes" in capsys.readouterr().err
    for setting, message in (("0.5 GiB", "a text value is a share of memory like '25%'; give a size as a number"),
                             (1.5e9, "must be a number of bytes or a share of memory like '25%', got 1500000000.0"),
                             (True, "got True"), (25, "25 is 25 bytes, too few to hold any task's weights")):
        with pytest.raises(ValueError, match=re.escape(message)):
            ServerConfig(registry="r", cache_bytes=setting)  # a library caller's value, or a unit left off
    assert ServerConfig(registry="r", cache_bytes=0).cache_bytes == 0  # no cache at all


def test_metrics_port_defaults_to_tritons_or_a_free_one():
    assert ServerConfig(registry="r").metrics_listen_port() == 8002
    assert ServerConfig(registry="r", port=0).metrics_listen_port() == 0  # tests and the demo: never a fixed port
    assert ServerConfig(registry="r", metrics_port=9100).metrics_listen_port() == 9100
    assert ServerConfig(registry="r", metrics_port=-1).metrics_listen_port() is None


def test_admin_methods_and_refusals():
    assert ADMIN_METHODS == {LOAD, UNLOAD}
    assert "without an admin token" in AdminAuthInterceptor(None).refusal(LOAD, [("authorization", "Bearer x")])
    assert "without an admin token" in AdminAuthInterceptor("").refusal(LOAD, [])
    guarded = AdminAuthInterceptor(TOKEN)
    assert guarded.refusal(LOAD, [("authorization", f"Bearer {TOKEN}")]) is None
    assert guarded.refusal(LOAD, [("authorization", f"Bearer {TOKEN}x")]) is not None
    assert guarded.refusal(LOAD, [("authorization", "Basic dXNlcjpwYXNz")]) is not None
    assert guarded.refusal(LOAD, [("authorization", "Bearer ")]) is not None


def test_json_formatter_writes_one_line_with_extra_fields_and_the_traceback():
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("maskbank.test").makeRecord(
            "maskbank.test", logging.ERROR, __file__, 1, "model %s\nfailed", ("a",), sys.exc_info(),
            extra={"model": "a", "generation": 3, "path": Path("/x")})
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "model a\nfailed" and entry["level"] == "ERROR" and entry["logger"] == "maskbank.test"
    assert (entry["model"], entry["generation"], entry["path"]) == ("a", 3, "/x")
    assert "RuntimeError: boom" in entry["exception"] and entry["time"].endswith("+00:00")


def test_a_child_server_interrupted_while_starting_is_not_left_behind():
    """Ctrl-C or SIGTERM (demo turns it into an exception) while a child server starts: the child
    is stopped, not orphaned holding its port and registry. In a fresh process, whose children
    nothing else reaps."""
    import subprocess
    import sys

    script = """
import _thread, re, signal, sys, threading
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal: a background job ignores it,
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # and then interrupt_main() does nothing
from maskbank.process import ChildServer
child = ChildServer([sys.executable, "-c", "import time; time.sleep(60)"], re.compile(r"never (\\S+):(\\d+)"))
threading.Timer(0.5, _thread.interrupt_main).start()
try:
    child.start()
except KeyboardInterrupt:
    print("interrupted, child exit status", child._process.poll())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "interrupted, child exit status -15", done.stdout + done.stderr


def _gone(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie nobody reaps counts: it runs no more)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_server_stops_when_its_parent_is_killed(tmp_path):
    """SIGKILL of the demo (or of a test run) gives it no chance to stop its server child: the child
    stops by itself (prctl PR_SET_PDEATHSIG), rather than living on, holding its port and registry."""
    train_model(tmp_path, "m", 1, TINY)
    script = f"""
import sys, time
from maskbank.process import ServerProcess
server = ServerProcess({str(tmp_path)!r}).start()
print(server._process.pid, flush=True)
time.sleep(120)
"""
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.kill()
        parent.wait(10)
        wait_for(lambda: _gone(child), 30, "the orphaned server to stop")
    finally:
        parent.kill()


def test_ctrl_c_while_the_command_starts_is_no_traceback():
    """Ctrl-C while `maskbank` imports PyTorch (seconds) printed a KeyboardInterrupt traceback. Here
    the interrupt lands, deterministically, as maskbank.cli is imported."""
    script = """
import sys
class Interrupting:
    def find_spec(self, name, path=None, target=None):
        if name == "maskbank.cli":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupting())
from maskbank.__main__ import run
raise SystemExit(run())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "\nmaskbank: interrupted\n")
    later = script.replace('"maskbank.cli"', '"trainer.spg"')  # while the parser imports the methods
    done = subprocess.run([sys.executable, "-c", later, "report", "m", "--registry", "nowhere"], capture_output=True,
                          text=True, timeout=60)
    assert (done.returncode, done.stderr) == (130, "\nmaskbank: interrupted\n")
    terminated = script.replace("raise KeyboardInterrupt", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    done = subprocess.run([sys.executable, "-c", terminated], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (143, "\nmaskbank: terminated (SIGTERM)\n")  # it died unannounced (-15)


@pytest.mark.parametrize("signum, at", [("SIGTERM", "atexit"), ("SIGINT", "atexit"), ("SIGTERM", "thread")])
def test_a_signal_after_the_command_ended_keeps_its_status(tmp_path, signum, at):
    """A signal during the interpreter's teardown, after a training had published everything and
    printed its report, turned status 0 into 143 with no word, or an 'Exception ignored' traceback.
    Here it lands in an atexit callback, or while the interpreter waits for a thread at exit."""
    script = f"""
import atexit, os, signal, threading, time
from maskbank.__main__ import run

def late():
    os.kill(os.getpid(), signal.{signum})
    time.sleep(0.5)

atexit.register(late) if "{at}" == "atexit" else None
code = run()
threading.Thread(target=late).start() if "{at}" == "thread" else None
raise SystemExit(code)
"""
    done = subprocess.run([sys.executable, "-c", script, "registry", "ls", "--registry", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, ""), done.stderr


def test_a_reader_that_leaves_early_is_no_error(tmp_path):
    """`maskbank report m | head -3` printed 'error: [Errno 32] Broken pipe' and exited 1."""
    train_model(tmp_path, "m", 1, TINY)
    child = subprocess.Popen([sys.executable, "-m", "maskbank", "report", "m", "--registry", str(tmp_path), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()  # the reader is gone before the first line
    assert (child.wait(60), child.stderr.read()) == (141, "")
    train = [sys.executable, "-m", "maskbank", "train", "--tasks", "3", "--registry", str(tmp_path), "--model", "m"]
    buffered = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe's default: block-buffered
    child = subprocess.Popen(train, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=buffered)
    child.stdout.close()  # `maskbank train ... | head -1`: it stopped as a shell tool does, but without a word
    assert child.wait(120) == 141 and child.stderr.read() == (
        f"\nmaskbank train: the reader of its output left; model 'm' has 2 of 3 task(s) in {tmp_path} (generation 2); "
        "the same command trains the rest\n")


def test_error_answers_are_logged_in_summary_not_one_line_each(caplog):
    """A client repeating a bad request in a loop wrote a line per request at INFO (1,285 in 25 s in a
    probe): now the first, then one line per call and status every FLOOD_LOG_SECONDS with the count."""
    from registry import ModelNotFound
    from serving.status import abort_details

    with caplog.at_level(logging.DEBUG, logger="maskbank.serving"):
        for n in range(20):
            assert abort_details("SummaryTestCall", ModelNotFound(f"no model named 'x{n}'"))[0] == grpc.StatusCode.NOT_FOUND
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert info == ["1 SummaryTestCall -> NOT_FOUND answer(s) so far; the latest: no model named 'x0'"]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 20


def test_an_answer_larger_than_the_server_sends_is_a_failure_of_that_request(tmp_path):
    """gRPC refused to send it after the servicer had counted a success, ended a whole stream with it,
    and logged a traceback each time. The servicer now refuses it as RESOURCE_EXHAUSTED, itself."""
    from serving._proto import pb
    from serving.errors import ResponseTooLarge
    from serving.status import status_code

    server = InferenceServer(ServerConfig(registry=str(tmp_path), port=0, metrics_port=-1, max_message_bytes=64 << 10))
    servicer = server.servicer
    assert servicer.max_answer_bytes == (64 << 10) - 4096  # a sixteenth kept for the envelope, at most 64 KiB
    fits = pb.ModelInferResponse(raw_output_contents=[b"\0" * (servicer.max_answer_bytes * 9 // 10)])
    servicer._check_size(fits)
    for large in (pb.ModelInferResponse(raw_output_contents=[b"\0" * servicer.max_answer_bytes]),
                  pb.ModelInferResponse(parameters={"task_scores": pb.InferParameter(string_param="{" + " " * 70000 + "}")})):
        with pytest.raises(ResponseTooLarge, match=r"the answer would be [\d,]+ bytes, more than this server sends in "
                                                   r"one message \(61,440: --max-message-bytes 65,536, less room for its "
                                                   r"envelope\): send fewer rows per request") as info:
            servicer._check_size(large)
        assert status_code(info.value) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_stopping_server_writes_the_counts_its_summaries_held_back(tmp_path, caplog):
    """The counts after a summary line waited on a daemon timer for the period's end: a server that
    stopped within it never wrote them."""
    from registry import ModelNotFound
    from serving.status import abort_details

    server = InferenceServer(ServerConfig(registry=str(tmp_path), port=0, metrics_port=-1))
    server.start()
    with caplog.at_level(logging.INFO, logger="maskbank.serving"):
        for n in range(3):
            abort_details("FlushTestCall", ModelNotFound(f"no model named 'x{n}'"))
        server.stop()
    assert [r.getMessage() for r in caplog.records if "FlushTestCall" in r.getMessage()] == [
        "1 FlushTestCall -> NOT_FOUND answer(s) so far; the latest: no model named 'x0'",
        "2 FlushTestCall -> NOT_FOUND answer(s) since the last such line; the latest: no model named 'x2'"]


def test_only_a_gone_reader_of_standard_output_is_a_quiet_stop():
    """A broken pipe elsewhere (not standard output's reader leaving) is an error of the command."""
    import os

    from maskbank.cli import _reader_gone

    read, write = os.pipe()
    with os.fdopen(write, "w") as out:
        assert not _reader_gone(out)
        os.close(read)
        assert _reader_gone(out)
    import socket

    mine, theirs = socket.socketpair()  # stdout a socket (a systemd journal stream, ssh): a hang-up once its peer closes
    with mine, mine.makefile("w") as out:
        assert not _reader_gone(out)
        theirs.close()
        assert _reader_gone(out)


def test_a_reader_of_standard_error_that_leaves_early_is_no_error_either(tmp_path):
    """`maskbank ... 2>&1 >/dev/null | true`: the error line itself met the broken pipe, and the command
    ended with an uncaught exception and status 1, whatever it had done."""
    child = subprocess.Popen([sys.executable, "-m", "maskbank", "report", "m", "--registry", str(tmp_path / "nowhere")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    child.stderr.close()
    assert child.wait(60) == 141


def test_an_answer_the_client_left_before_it_was_sent_is_no_error_in_the_log(tmp_path, caplog):
    """gRPC's aio server logs an answer it could not send (the client's deadline passed as it went out) at
    ERROR with a traceback: alerts on ERROR fired on client behaviour. It is DEBUG, shown only at DEBUG."""
    from serving.logs import GRPC_AIO_LOGGER

    InferenceServer(ServerConfig(registry=str(tmp_path), port=0, metrics_port=-1)).stop()  # installs the filter
    grpc_log = logging.getLogger(GRPC_AIO_LOGGER)
    try:
        raise RuntimeError("Failed \"execute_batch\"")
    except RuntimeError:
        with caplog.at_level(logging.INFO):
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]", "/x/ModelInfer")
            grpc_log.error("another gRPC error")
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("ERROR", "another gRPC error")]
        caplog.clear()
        with caplog.at_level(logging.DEBUG), caplog.at_level(logging.DEBUG, logger="maskbank"):
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]", "/x/ModelInfer")
        assert [r.levelname for r in caplog.records] == ["DEBUG"]


@pytest.mark.parametrize("given", [None, "", "event_engine_poller_for_python"], ids=["unset", "empty", "users"])
def test_serve_sets_grpc_experiments_before_grpc_is_imported_unless_the_environment_does(given):
    """`maskbank serve` turns gRPC's EventEngine poller for Python off (cheaper per request; README, Operating
    the server); gRPC reads GRPC_EXPERIMENTS once, when imported, so it must be set before; other commands and
    a GRPC_EXPERIMENTS of the user's own are left alone."""
    script = """
import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "grpc":
            print("at grpc import:", repr(os.environ.get("GRPC_EXPERIMENTS")), flush=True)
            sys.meta_path.remove(self)
sys.meta_path.insert(0, Watch())
from maskbank.__main__ import run
raise SystemExit(run())
"""
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    if given is not None:
        env["GRPC_EXPERIMENTS"] = given
    serve = SERVE_GRPC_EXPERIMENTS if given is None else given
    for command, expected in ((["serve", "--help"], serve), (["--log-l", "INFO", "serve", "--help"], serve),
                              (["registry", "ls", "--help"], given)):  # argparse takes --log-l for --log-level
        done = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, timeout=60,
                              env=env)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[0] == f"at grpc import: {expected!r}"
