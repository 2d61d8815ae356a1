"""Command line: `maskbank train | serve | demo | report | registry | export`.
Run `maskbank COMMAND --help` for details."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import re
import select
import signal
import sys
import textwrap
import threading
from pathlib import Path

from registry import MaskbankError

from .interrupts import interrupted_status, raise_terminated, stopped_by
from .parent import stop_with_parent

EXAMPLES = """examples:
  maskbank train --method supsup --stream permuted-digits --tasks 5 --registry ./demo-registry --model digits
  maskbank train --tasks 8 --registry ./demo-registry --model digits      # append tasks 5..7
  maskbank serve --registry ./demo-registry --port 8001
  maskbank serve --registry ./demo-registry --backend onnxruntime
  maskbank export onnx digits --registry ./demo-registry --out digits-onnx
  maskbank export triton digits --registry ./demo-registry --out triton-repo
  maskbank report digits --registry ./demo-registry --plot matrix.png
  maskbank registry audit digits --registry ./demo-registry --plot audit.png
  maskbank demo
"""


_BYTE_UNITS = {"": 1, "B": 1, **{f"{prefix}{suffix}": 1000**power for power, prefix in enumerate("KMGT", 1)
                                 for suffix in ("", "B")},
               **{f"{prefix}{suffix}": 1 << 10 * power for power, prefix in enumerate("KMGT", 1)
                  for suffix in ("I", "IB")}}  # Ki, Mi, Gi, Ti: Kubernetes' spelling of KiB, MiB, GiB, TiB


def byte_size(text: str) -> int:
    """A size in bytes: a plain integer or a number with a unit (512MiB, 1.5GiB, 4Gi, 64M; K/M/G/T are powers of
    1000, KiB/MiB/GiB/TiB (or Ki/Mi/Gi/Ti, as Kubernetes writes them) of 1024), for flags like --cache-bytes."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in _BYTE_UNITS:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size in bytes (examples: 268435456, 256MiB, 1.5GiB, 4Gi, 64M)")
    size = float(match.group(1)) * _BYTE_UNITS[unit]
    if size >= 2**63:
        raise argparse.ArgumentTypeError(f"'{text}' is too large a size in bytes")
    return int(size)


def cache_size(text: str) -> int | str:
    """--cache-bytes: a size in bytes (as byte_size), or a share of memory like 25% (kept as text: the
    server resolves it against the memory of the device it serves on)."""
    if text.strip().endswith("%"):
        from serving.memory import cache_share

        try:
            cache_share(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix("--cache-bytes ")) from None
        return text.strip()
    try:
        return byte_size(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(f"{error}, nor a share of memory (like 25%)") from None


def _architecture(text: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); example: '{{\"arch\": \"mlp\", \"sizes\": [64, 256, 256, 10]}}'")
    if not isinstance(spec, dict) or "arch" not in spec:
        raise argparse.ArgumentTypeError("an architecture spec is a JSON object with an 'arch' key")
    return spec


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def _as_given(value) -> str:
    """An option's value as it is written on the command line (JSON: null, true), not Python's None, True."""
    return value if isinstance(value, str) else json.dumps(value)


def given_path(text: str) -> str:
    """An argparse type for a file, folder or URL: not empty, which (an unset shell variable) meant the
    current folder: `--out ""` exported into it, `--plot ""` wrote '.png.png'. A leading `~` is the home
    folder, as --data-root reads it (the shell leaves `--registry=~/reg` alone: it made a folder '~')."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset variable?): name a file or folder")
    return os.path.expanduser(text)


def local_path(text: str) -> str:
    """An argparse type for a file or folder written on this machine (`--out`, `--plot`): a URL is refused
    (`--out s3://bucket/x` made a folder './s3:' and said it wrote s3://...), fsspec's chained ones too;
    file:///PATH (or file://~/PATH) is PATH."""
    text = given_path(text)
    if text.startswith("file://") and text[len("file://"):].startswith(("/", "~")):
        return os.path.expanduser(text[len("file://"):])
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text} is a URL; this writes to a local path: write here, then copy it "
                                         "to the store (aws s3 cp --recursive ...), or give file:///ABSOLUTE/PATH")
    return text


def plot_file(text: str) -> str:
    """An argparse type for --plot: the file to write, with '.png' added to a name without an extension
    (as matplotlib would add it, so the name printed is the file written); an extension matplotlib
    cannot write is refused before any work."""
    from matplotlib.backend_bases import FigureCanvasBase

    text = local_path(text)  # a ~ expanded: the file written is the one named
    path = Path(text)
    if not path.suffix:
        return f"{text}.png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        raise argparse.ArgumentTypeError(f"cannot draw a '{path.suffix}' file; name one ending in "
                                         f"{', '.join('.' + f for f in sorted(formats))}")
    return text


def progress_bar(description: str, unit: str):
    """A `progress(items, total)` wrapper for long library work (registry.progress): a tqdm bar on
    stderr, shown only when stderr is a terminal, so logs and --json output stay clean."""
    from tqdm import tqdm

    return lambda items, total: tqdm(items, total=total, desc=description, unit=unit, disable=None)


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (a count), refused before any work starts."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def thread_count(text: str) -> int:
    """An argparse type for --threads: 1 to MAX_THREADS (100,000 made OpenMP run out of memory, and
    larger ones overflowed torch's C integer, each with a traceback)."""
    from serving.server import MAX_THREADS

    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads, got {value}")
    return value


def _add_train(commands) -> None:
    from trainer import method_names, stream_names

    p = commands.add_parser(
        "train", help="learn tasks one after another and publish each into a registry",
        description="Learn tasks until MODEL has --tasks of them, publishing a new registry generation after "
        "each. On an existing model this appends tasks with the model's stored settings; published tasks "
        "are never retrained or changed.",
        epilog=_method_defaults_text(), formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--registry", required=True, type=given_path,
                   help="registry directory (created if missing), or an fsspec URL (s3://bucket/prefix) shared by servers")
    p.add_argument("--model", required=True, help="model name in the registry")
    p.add_argument("--tasks", type=positive_int, required=True, help="total number of tasks the model should have")
    p.add_argument("--method", choices=method_names(), help="continual-learning method (required for a new model)")
    p.add_argument("--stream", choices=stream_names(), help="task stream (required for a new model)")
    p.add_argument("--seed", type=int, help="seed of the stream, backbone and every task, from 0 to 2**32 - 1 (default 0)")
    p.add_argument("--arch", type=_architecture, help="architecture spec as JSON (default: MLP 512-512 for the stream)")
    p.add_argument("--data-root", help="folder with torchvision dataset files (for split-/permuted-<dataset> streams)")
    options = p.add_argument_group("method options (each method takes those its config has; others are an error)")
    for flag, _, kwargs in METHOD_OPTIONS:
        options.add_argument(flag, **kwargs)
    options.add_argument("--set", dest="options", action="append", type=_option, default=[], metavar="KEY=VALUE",
                         help="any other option of the method's config, e.g. --set weight_epochs=5 (repeatable; "
                         "values are read as JSON when they parse, else as text, and checked against the option's type; null is the "
                         "option's default)")
    p.add_argument("--fwt", action="store_true",
                   help="also train each task alone, as the reference for forward transfer (doubles training time)")
    p.add_argument("--threads", type=thread_count, help="torch intra-op threads (default: torch's choice)")


def _method_defaults_text() -> str:
    """The train command's epilog: each method's option defaults (they differ by method, so the
    option flags above cannot show one)."""
    from trainer import method_defaults, method_names

    lines = ["defaults of each method's options (the flags above, or --set KEY=VALUE for any):"]
    for name in method_names():
        options = " ".join(f"{key}={value if isinstance(value, str) else json.dumps(value)}"  # as --set reads it
                           for key, value in method_defaults(name).items())
        lines.append(textwrap.fill(options, 100, initial_indent=f"  {name}: ", subsequent_indent="      "))
    return "\n".join(lines)


# flag, method config key, argparse keyword arguments. Defaults live in each method's Config.
METHOD_OPTIONS = [
    ("--density", "density", dict(type=float, help="fraction of each layer's weights a mask keeps (top-k masks; "
                                  "--mask sign keeps the weights whose score is >= 0, about half, and refuses --density)")),
    ("--epochs", "epochs", dict(type=int, help="epochs per task")),
    ("--lr", "lr", dict(type=float, help="learning rate")),
    ("--batch-size", "batch_size", dict(type=int, help="training batch size")),
    ("--mask", "mask", dict(choices=["topk", "sign"], help="supsup: top-k at --density, or the sign threshold s >= 0")),
    ("--kkt", "kkt", dict(action=argparse.BooleanOptionalAction, default=None,
                          help="exssnet: start each mask from the most similar earlier task's scores (KKT)")),
    ("--basis", "basis", dict(choices=["hetero", "homo", "random"], help="impresslearn: how the basis masks are made")),
    ("--basis-size", "basis_size", dict(type=int, help="impresslearn: number of basis masks")),
    ("--share", "share", dict(help="packnet-share: all, none, lowest, omit-lowest, or task ids like 0,2 (each task "
                              "shares those of them learned before it; later ids are skipped)")),
]


def _add_report(commands) -> None:
    p = commands.add_parser("report", help="accuracy matrix and continual-learning metrics of a trained model",
                            description="Show what training recorded for MODEL: the accuracy matrix, average accuracy, "
                            "forgetting, BWT, FWT (when trained with --fwt), and per-task metrics and training time.")
    p.add_argument("model")
    p.add_argument("--registry", required=True, type=given_path, help="registry directory or URL")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE.png", type=plot_file,
                   help="draw the accuracy matrix as a heatmap (png, or the format of the file's extension: svg, pdf, ...)")


def _add_serve(commands) -> None:
    from serving import ServerConfig, mode_names
    from serving.backends import BACKENDS
    from serving.logs import FORMATS
    from serving.server import LIFO_AFTER_MS

    d = ServerConfig(registry="")
    p = commands.add_parser(
        "serve", help="serve a registry over the Open Inference Protocol (gRPC)",
        description="Serve every model of a registry over gRPC (Open Inference Protocol, tritonclient-compatible). "
        "New generations published to the registry are picked up without a restart. Stop with Ctrl-C or SIGTERM "
        "(graceful: health goes NOT_SERVING, running calls finish); SIGHUP makes it look at the registry at once, "
        "without waiting for the next poll.",
    )
    p.add_argument("--registry", required=True, type=given_path,
                   help="registry directory, or an fsspec URL (s3://bucket/prefix, memory://...) shared by replicas")
    p.add_argument("--host", default=d.host, help=f"address to bind (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 picks a free one)")
    p.add_argument("--poll-interval", type=float, default=d.poll_interval, help=f"seconds between checks of the registry for new generations (default {d.poll_interval:g})")
    p.add_argument("--task-inference", choices=mode_names(), default=d.task_inference,
                   help="how to infer the task when a request names none (per request: parameter 'task_inference'; "
                   f"default {d.task_inference}: exact, cost grows with the task count); models this mode cannot run "
                   "on (oneshot on SPG tasks) use exhaustive")
    p.add_argument("--task-shortlist", type=int, default=d.task_shortlist, metavar="K",
                   help="the ranking task-inference modes (oneshot, oneshot-input, binary, alpha) check their K "
                   "best-ranked tasks exactly by entropy: K more forwards for reliability (per request: parameter "
                   f"'task_shortlist'; default {d.task_shortlist}: the ranking alone)")
    p.add_argument("--cache-bytes", type=cache_size, default=d.cache_bytes, metavar="SIZE",
                   help="bound of the per-task effective-weight LRU cache: bytes, with a unit like 512MiB, or a share "
                   f"of memory like 50%% (default {d.cache_bytes.replace('%', '%%')}: of the container's memory limit, else "
                   "the machine's memory; with --device cuda, of the lower of that and the GPU's memory; 0: no "
                   "cache). The cache holds only the tasks "
                   "requests use; once full, least recently used tasks are evicted and rebuilt on demand. "
                   "It also holds the float mask matrix of the gradient task-inference modes when it fits (4 bytes "
                   "per weight and task); without it they compute from the bitpacked masks, 2-3x slower")
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help=f"most rows in one request and in one batched execution (default {d.max_batch_size})")
    p.add_argument("--max-queue-delay-us", type=int, default=d.max_queue_delay_us,
                   help="how long the dynamic batcher lets the first request of a batch wait for others to join, in "
                   f"microseconds (default {d.max_queue_delay_us}: no waiting; on the compute pool requests still merge "
                   "while an execution runs). A batch stops waiting early once it holds as many requests as the "
                   "last batch of its task that waited the whole delay")
    p.add_argument("--instances", type=int, default=d.instances,
                   help="batches of one task that may run at once, like Triton's instance count; requests beyond "
                   f"them queue and are merged into the next batch (default {d.instances})")
    p.add_argument("--model", action="append", dest="models", metavar="NAME",
                   help="serve only this model of the registry (repeat for several); the others, and models "
                   "published later, are listed as unloaded until an admin load. For replicas that share one "
                   "registry but each serve part of its models (default: every model, new ones included)")
    p.add_argument("--max-queue-size", type=int, default=d.max_queue_size, metavar="N",
                   help="the most inference requests the server holds at once for one model, waiting or "
                   "computing (Triton's max_queue_size, per model as there); a request beyond them is refused at "
                   "once with UNAVAILABLE (retryable: back off, or send to another replica), so that under overload "
                   "the requests taken keep a bounded latency instead of all waiting longer (default "
                   f"{d.max_queue_size}: no bound, as Triton's)")
    p.add_argument("--default-timeout-us", type=int, default=d.default_timeout_us, metavar="US",
                   help="the longest a request may wait for the compute pool, in microseconds, unless its own "
                   "`timeout` parameter says otherwise (Triton's default_timeout_microseconds); one that waited "
                   "longer is answered DEADLINE_EXCEEDED without being computed, so that under overload the pool "
                   "does not spend its time on requests their callers are about to give up on (default "
                   f"{d.default_timeout_us}: none)")
    p.add_argument("--lifo-after-ms", type=float, default=d.lifo_after_ms, metavar="MS",
                   help="once the compute pool's oldest waiting request has waited this long, the queue is standing "
                   "(more is offered than the server computes) and the pool takes the newest request first until "
                   "it drains (adaptive LIFO): callers still waiting are answered rather than those about to give "
                   "up, instead of every request waiting longer than the last; the oldest wait until the overload "
                   f"passes. 0 keeps arrival order always (default {LIFO_AFTER_MS:g} without --max-queue-size, 0 "
                   "with it: the bound keeps waits short in arrival order)")
    p.add_argument("--priority-levels", type=int, default=d.priority_levels, metavar="N",
                   help="priority levels of the compute pool (Triton's priority_levels): a request's `priority` "
                   "parameter (tritonclient: infer(..., priority=P)) from 1, the highest, to N; a thread takes the "
                   "highest level that has work. 0, or beyond N, means --default-priority-level. Requests small "
                   "enough to run on the event loop start at once at any priority (default "
                   f"{d.priority_levels}: one level, priorities ignored, as Triton's)")
    p.add_argument("--default-priority-level", type=int, default=d.default_priority_level, metavar="P",
                   help="the level of requests that give no priority, from 1 to --priority-levels (default: the "
                   "lowest, N)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="threads for the calls that do not run on the event loop: readiness, metadata, config, "
                   f"statistics, repository index, task listing (default {d.workers})")
    p.add_argument("--threads", type=int,
                   help="intra-op threads for inference, torch's and ONNX Runtime's (default: theirs, one per core)")
    p.add_argument("--backend", choices=BACKENDS, default=d.backend,
                   help=f"what runs the forward passes (default {d.backend}); onnxruntime uses the CUDA provider when a "
                   "GPU is usable, else the CPU; task inference by gradients (oneshot, oneshot-input, binary) always runs on PyTorch, "
                   "and every response's parameter 'backend' says which ran")
    p.add_argument("--device", default=d.device,
                   help=f"where PyTorch runs the forwards and keeps the backbones and the cached weights: cpu, cuda or "
                   f"cuda:N (default {d.device}). On a GPU, --cache-bytes bounds GPU memory; SupSup and ExSSNeT tasks "
                   "also keep their bitpacked masks there (1 bit per weight) and build their weights there on a cache "
                   "miss; other methods build on the CPU and copy")
    ops = p.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                     help="port of the Prometheus metrics endpoint http://HOST:PORT/metrics, bound on --host "
                     "(default 8002 like Triton, or a free port when --port is 0; 0: a free port; negative: off)")
    ops.add_argument("--admin-token", default=None, metavar="TOKEN",
                     help="bearer token that model load/unload calls must send as the metadata header "
                     "'authorization: Bearer TOKEN' (default: $MASKBANK_ADMIN_TOKEN, which keeps it out of the "
                     "process list; with neither, load/unload are refused)")
    ops.add_argument("--tls-cert", metavar="FILE",
                     help="PEM certificate (chain): serve gRPC over TLS (needs --tls-key)")
    ops.add_argument("--tls-key", metavar="FILE", help="PEM private key of --tls-cert, unencrypted")
    ops.add_argument("--max-message-bytes", type=byte_size, default=d.max_message_bytes, metavar="SIZE",
                     help=f"largest gRPC request and response, in bytes or with a unit like 16MiB (default "
                     f"{d.max_message_bytes >> 20}MiB; from 4KiB to 2GiB less 1 byte, gRPC's limit); a "
                     "larger request is refused with RESOURCE_EXHAUSTED")
    ops.add_argument("--grace-seconds", type=float, default=d.grace_seconds, metavar="SECONDS",
                     help=f"on SIGTERM/Ctrl-C, how long running calls may finish before the server stops "
                     f"(default {d.grace_seconds:g})")
    ops.add_argument("--drain-seconds", type=float, default=d.drain_seconds, metavar="SECONDS",
                     help="on SIGTERM/Ctrl-C, how long to go on serving with health NOT_SERVING (and ServerReady "
                     "false) before refusing new calls, so that readiness probes and balancers move traffic away "
                     f"first: a Kubernetes readinessProbe's period times its failureThreshold (default "
                     f"{d.drain_seconds:g}: stop accepting at once)")
    ops.add_argument("--max-connection-age", type=float, default=d.max_connection_age, metavar="SECONDS",
                     help="close each client connection after this long (gRPC's GOAWAY: clients reconnect by "
                     "themselves, and calls under way get --grace-seconds to finish), so that a load balancer that "
                     "spreads connections rather than requests, such as a Kubernetes Service, also spreads "
                     "long-lived clients over replicas added later; long streams (WatchModel) then end with the "
                     f"connection and must be reopened (default {d.max_connection_age:g}: never)")
    ops.add_argument("--max-concurrent-streams", type=int, default=d.max_concurrent_streams, metavar="N",
                     help="calls one client connection may have open at once (HTTP/2's MAX_CONCURRENT_STREAMS); a "
                     "client beyond it waits, or gets UNAVAILABLE (retryable), before the server reads the call. "
                     "The one rule that reaches small requests computed on the event loop under overload: without "
                     "it they wait in gRPC's own queue in arrival order (default 0: gRPC's, no limit)")
    ops.add_argument("--log-format", choices=FORMATS, default="text",
                     help="log lines as text, or as one JSON object per line (time, level, logger, message, fields); "
                     "the level is maskbank's --log-level")


def _add_demo(commands) -> None:
    p = commands.add_parser(
        "demo", help="train 5 tasks, publish, serve, and query with tritonclient",
        description="The main job: SupSup on 5 permuted-digits tasks, published to a registry, served on loopback, "
        "queried with the stock tritonclient with and without a task id; prints both accuracy tables.",
    )
    p.add_argument("--registry", default="demo-registry", type=given_path, help="registry directory (default ./demo-registry)")
    p.add_argument("--model", default="digits", help="model name (default digits)")
    p.add_argument("--tasks", type=positive_int, default=5, help="number of permuted-digits tasks (default 5)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="batch size of the queries (default 16)")
    p.add_argument("--threads", type=thread_count, default=1,
                   help="torch intra-op threads for training and for the server (default 1: the demo's network is "
                   "small, and on a shared machine more threads only wait for each other: 54-71 s per task against "
                   "6-7 s with 1 on a busy 2-core machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskbank", description="Continual-learning model serving: train, publish, serve.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="maskbank's own log level (default INFO); libraries (botocore, ...) log warnings and "
                        "errors only, unless DEBUG")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_serve(commands)
    _add_demo(commands)
    _add_report(commands)
    from .export_cli import add_export_commands
    from .registry_cli import add_registry_commands

    add_registry_commands(commands)
    add_export_commands(commands)
    return parser


def _train(args) -> None:
    import torch

    from registry import PublishConflict, Registry
    from trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = {key: getattr(args, flag.lstrip("-").replace("-", "_")) for flag, key, _ in METHOD_OPTIONS}
    flags = {key: flag for flag, key, _ in METHOD_OPTIONS}
    given: dict = {}
    for key, value in args.options:  # the later one won, silently
        for other, what in ((config.get(key), flags.get(key)), (given.get(key), f"--set {key}=")):
            if other is not None and str(other) != str(value):  # as text: --share 0 is --set share=0
                raise MaskbankError(f"{what}{'' if what.endswith('=') else ' '}{_as_given(other)} and "
                                    f"--set {key}={_as_given(value)} disagree: give one")
        given[key] = value
    config.update(given)
    requested = {"method": args.method, "stream": args.stream, "seed": args.seed, "architecture": args.arch,
                 "data_root": args.data_root, "method_config": config}
    registry = Registry(args.registry)
    registry.check_location(must_exist=False)  # an S3 bucket that does not exist: before any training
    try:
        manifest = train(registry, args.model, args.tasks, requested, fwt=args.fwt)
    except PublishConflict:  # the API's "reload and retry", said for the command line
        raise PublishConflict(f"another publisher (a second `maskbank train`?) published generation "
                              f"{registry.latest_generation(args.model)} of model '{args.model}' while this run "
                              "trained the task it would have been, which is not published: run this command again "
                              "once the other has finished; it goes on from the tasks published (or names the "
                              "settings in which the other's model differs)") from None
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: every task published so far stays; say where to pick up
        _where_training_stopped(registry, args, stopped_by(interrupt))
        raise SystemExit(interrupted_status(interrupt)) from None
    except BrokenPipeError:  # `maskbank train ... | head -1`: stopped as a shell tool is, but not without a word
        with contextlib.suppress(OSError):  # stderr's reader may be gone too
            _where_training_stopped(registry, args, "the reader of its output left")
        raise
    print(format_report(manifest))


def _where_training_stopped(registry, args, why: str) -> None:
    """Say, on stderr, that training stopped early: every task published so far stays, and the same
    command trains the rest."""
    published = registry.find_manifest(args.model)
    done = len(published.tasks) if published else 0
    state = f"generation {published.generation}" if published else "nothing published"
    rest = "; the same command trains the rest" if done < args.tasks else ""
    print(f"\nmaskbank train: {why}; model '{args.model}' has {done} of {args.tasks} task(s) in "
          f"{args.registry} ({state}){rest}", file=sys.stderr)


def _report(args) -> None:
    from registry import Registry
    from trainer.metrics import plot_matrix
    from trainer.record import training_record

    registry = Registry(args.registry)
    registry.check_location()  # a mistyped path is no registry, not one without this model
    manifest = registry.manifest(args.model)
    if training_record(manifest) is None:  # KeyError traceback before
        raise MaskbankError(f"model '{args.model}' has no training record (it was published by a program of its own, "
                            "not `maskbank train`): there is no accuracy matrix to report; `maskbank registry show "
                            f"{args.model}` lists its tasks")
    if args.plot:
        plot_matrix(manifest.training["accuracy_matrix"], [t.name for t in manifest.tasks], args.plot,
                    f"{manifest.model}: {manifest.training['settings']['method']} on {manifest.training['settings']['stream']}")
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.json:
        tasks = [{"id": t.id, "name": t.name, **t.metrics} for t in manifest.tasks]
        print(json.dumps({"model": manifest.model, "generation": manifest.generation, **manifest.training, "tasks": tasks}, indent=2))
    else:
        print(format_report(manifest))


def _fwt_coverage(training: dict, tasks: int) -> str:
    """A note when FWT averages over only some of the tasks it could (--fwt given on some runs only)."""
    covered = training.get("fwt_tasks")
    if training.get("fwt") is None or covered is None or covered >= tasks - 1:
        return ""
    return f" (over {covered} of the {tasks - 1} tasks after the first: the others were trained without --fwt)"


def _no_fwt(manifest) -> str:
    """Why a report has no FWT: no task was trained with --fwt, or only the first was, which FWT cannot
    use (it compares a task learned after others with the same task learned alone)."""
    if any("alone_accuracy" in t.metrics for t in manifest.tasks):
        return "(only the first task was trained with --fwt; FWT needs a later one)"
    return "(train with --fwt)"


def format_report(manifest) -> str:
    """The accuracy matrix, the summary metrics and the per-task metrics of a manifest whose training
    record `trainer.record.training_record` has read."""
    from trainer.metrics import format_matrix

    training, names = manifest.training, [t.name for t in manifest.tasks]
    fwt = training.get("fwt")
    lines = [f"model '{manifest.model}' generation {manifest.generation}: {training['settings']['method']} on "
             f"{training['settings']['stream']} (seed {training['settings']['seed']})", "",
             format_matrix(training["accuracy_matrix"], names), "",
             f"average accuracy {training['average_accuracy']:.3f}  forgetting {training['forgetting']:.3f}  "
             f"BWT {training['bwt']:.3f}  FWT " + (_no_fwt(manifest) if fwt is None else f"{fwt:.3f}")
             + _fwt_coverage(training, len(manifest.tasks)), ""]
    keys = sorted({k for t in manifest.tasks for k, v in t.metrics.items() if isinstance(v, (int, float)) and k != "accuracy"})
    lines.append("| task | " + " | ".join(keys) + " |")
    lines.append("|---" * (len(keys) + 1) + "|")
    for t in manifest.tasks:
        cells = [t.metrics.get(k) for k in keys]
        lines.append(f"| {t.id} ({t.name}) | " + " | ".join("-" if v is None else f"{v:.4g}" for v in cells) + " |")
    others = [(t, {k: v for k, v in t.metrics.items() if not isinstance(v, (int, float))}) for t in manifest.tasks]
    if any(metrics for _, metrics in others):  # lists and texts (connectivity scores, KKT sources, ...): a line a task
        lines += ["", "other metrics:"]
        lines += [f"- {t.id} ({t.name}): " + "; ".join(f"{k}: {_compact(v)}" for k, v in sorted(metrics.items()))
                  for t, metrics in others if metrics]
    return "\n".join(lines)


def _compact(value) -> str:
    """A metric in a few characters: numbers to 4 significant digits, lists and dicts of them likewise."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_compact, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_compact(v)}" for k, v in value.items()) + "}"
    return str(value)


def _serve(args) -> None:
    from serving import ServerConfig, serve_forever
    from serving.logs import configure

    try:
        config = ServerConfig(
            registry=args.registry, host=args.host, port=args.port, poll_interval=args.poll_interval,
            task_inference=args.task_inference, task_shortlist=args.task_shortlist, cache_bytes=args.cache_bytes, workers=args.workers,
            torch_threads=args.threads, backend=args.backend, device=args.device, max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us,
            instances=args.instances, max_queue_size=args.max_queue_size, models=args.models,
            default_timeout_us=args.default_timeout_us, lifo_after_ms=args.lifo_after_ms,
            priority_levels=args.priority_levels, default_priority_level=args.default_priority_level,
            max_message_bytes=args.max_message_bytes, grace_seconds=args.grace_seconds, drain_seconds=args.drain_seconds,
            max_connection_age=args.max_connection_age, max_concurrent_streams=args.max_concurrent_streams,
            metrics_port=args.metrics_port,
            admin_token=args.admin_token or os.environ.get("MASKBANK_ADMIN_TOKEN") or None,
            tls_cert=args.tls_cert, tls_key=args.tls_key,
        )
    except ValueError as error:  # contradictory or out-of-range flags, unusable TLS files
        print(f"maskbank serve: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    configure(args.log_format)
    try:
        serve_forever(config)
    except OSError as error:  # a port in use or not bindable
        print(f"maskbank serve: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.registry, args.model, args.tasks, args.batch_size, args.threads)


PLUGINS_VARIABLE = "MASKBANK_PLUGINS"


def load_plugins() -> None:
    """Import the modules MASKBANK_PLUGINS names (comma-separated): a plugin registers its methods and
    materialisers when imported, so `train --method NAME` offers them and `serve` (which inherits the
    variable) can materialise their tasks. MaskbankError naming the module when one cannot be imported."""
    for name in filter(None, (part.strip() for part in os.environ.get(PLUGINS_VARIABLE, "").split(","))):
        try:
            importlib.import_module(name)
        except Exception as error:  # noqa: BLE001  the plugin's own failure, in one line
            raise MaskbankError(f"{PLUGINS_VARIABLE}: cannot import plugin module '{name}': "
                                f"{type(error).__name__}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    stop_with_parent()  # a server the demo or a test started must not outlive it
    try:
        load_plugins()  # before the parser: --method's choices include the plugins' methods
    except MaskbankError as error:
        print(f"maskbank: error: {error}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:  # a process of its own, not a caller (a test) that set logging up
        # libraries (botocore's "Found credentials ...") stay at WARNING unless maskbank's level is DEBUG
        logging.basicConfig(level=logging.DEBUG if args.log_level == "DEBUG" else logging.WARNING,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        logging.getLogger("maskbank").setLevel(args.log_level)
    terminate = None
    if threading.current_thread() is threading.main_thread():  # serve, once listening, drains on its own handlers
        terminate = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        code = _run(args)
        sys.stdout.flush()  # here, so that a reader gone (`| head`) is seen below, not at interpreter exit
        return code
    except BrokenPipeError as error:
        gone = [stream for stream in (sys.stdout, sys.stderr) if _reader_gone(stream)]
        if not gone:  # a pipe of something else broke: the command failed
            print(f"{_command(args)}: error: {error}", file=sys.stderr)
            return 1
        # `maskbank report m | head`: the reader took what it wanted and left (of stdout, or of stderr)
        for stream in gone:
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # nothing more to flush at exit
        return 128 + signal.SIGPIPE  # as a shell tool killed by SIGPIPE, silently
    finally:
        if terminate is not None:
            signal.signal(signal.SIGTERM, terminate)


def _command(args) -> str:
    """The command as its messages name it, with its action (`maskbank registry audit`), as argparse does."""
    action = getattr(args, "registry_command", None) or getattr(args, "export_command", None)
    return f"maskbank {args.command}" + (f" {action}" if action else "")


def _reader_gone(stream) -> bool:
    """Whether `stream` is a pipe or socket whose reader has closed it (poll reports an error, or for a
    socket a hang-up, on it)."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll here, or the stream is no file
        return True


def _run(args) -> int:
    try:
        if args.command == "registry":
            from .registry_cli import run_registry_command

            return run_registry_command(args)
        if args.command == "export":
            from .export_cli import run_export_command

            return run_export_command(args)
        {"train": _train, "serve": _serve, "demo": _demo, "report": _report}[args.command](args)
    except MaskbankError as error:
        print(f"{_command(args)}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        raise  # not an error of the command's: main() ends quietly
    except OSError as error:  # a file that cannot be written or read, a port taken: the system's words suffice
        print(f"{_command(args)}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:  # Ctrl-C or SIGTERM: the shell's convention, without a traceback
        print(f"\n{_command(args)}: {stopped_by(interrupt)}", file=sys.stderr)
        return interrupted_status(interrupt)
    return 0


