"""Command line: `maskbank train | serve | demo`. Run `maskbank COMMAND --help` for details."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from registry import MaskbankError

EXAMPLES = """examples:
  maskbank train --method supsup --stream permuted-digits --tasks 5 --registry ./demo-registry --model digits
  maskbank train --tasks 8 --registry ./demo-registry --model digits      # append tasks 5..7
  maskbank serve --registry ./demo-registry --port 8001
  maskbank registry audit digits --registry ./demo-registry --plot audit.png
  maskbank demo
"""


def _architecture(text: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); example: '{{\"arch\": \"mlp\", \"sizes\": [64, 256, 256, 10]}}'")
    if not isinstance(spec, dict) or "arch" not in spec:
        raise argparse.ArgumentTypeError("an architecture spec is a JSON object with an 'arch' key")
    return spec


def _add_train(commands) -> None:
    from trainer import method_names, stream_names

    p = commands.add_parser(
        "train", help="learn tasks one after another and publish each into a registry",
        description="Learn tasks until MODEL has --tasks of them, publishing a new registry generation after "
        "each. On an existing model this appends tasks with the model's stored settings; published tasks "
        "are never retrained or changed.",
    )
    p.add_argument("--registry", required=True, help="registry directory (created if missing)")
    p.add_argument("--model", required=True, help="model name in the registry")
    p.add_argument("--tasks", type=int, required=True, help="total number of tasks the model should have")
    p.add_argument("--method", choices=method_names(), help="continual-learning method (required for a new model)")
    p.add_argument("--stream", choices=stream_names(), help="task stream (required for a new model)")
    p.add_argument("--seed", type=int, help="seed of the stream, backbone and every task (default 0)")
    p.add_argument("--arch", type=_architecture, help="architecture spec as JSON (default: MLP 512-512 for the stream)")
    p.add_argument("--density", type=float, help="fraction of each layer's weights a mask keeps (supsup default 0.5)")
    p.add_argument("--epochs", type=int, help="epochs per task (supsup default 30)")
    p.add_argument("--lr", type=float, help="learning rate (supsup default 0.3, SGD with momentum)")
    p.add_argument("--batch-size", type=int, help="training batch size (default 64)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")


def _add_serve(commands) -> None:
    from serving import ServerConfig, mode_names

    d = ServerConfig(registry="")
    p = commands.add_parser(
        "serve", help="serve a registry over the Open Inference Protocol (gRPC)",
        description="Serve every model of a registry over gRPC (Open Inference Protocol, tritonclient-compatible). "
        "New generations published to the registry are picked up without a restart. Stop with Ctrl-C or SIGTERM "
        "(graceful: health goes NOT_SERVING, running calls finish).",
    )
    p.add_argument("--registry", required=True, help="registry directory")
    p.add_argument("--host", default=d.host, help=f"address to bind (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 picks a free one)")
    p.add_argument("--poll-interval", type=float, default=d.poll_interval, help="seconds between registry checks")
    p.add_argument("--task-inference", choices=mode_names(), default=d.task_inference,
                   help="how to infer the task when a request names none (per request: parameter 'task_inference')")
    p.add_argument("--cache-bytes", type=int, default=d.cache_bytes, help="bound of the effective-weight cache")
    p.add_argument("--workers", type=int, default=d.workers, help="gRPC handler threads")
    p.add_argument("--threads", type=int, help="torch intra-op threads for inference")


def _add_demo(commands) -> None:
    p = commands.add_parser(
        "demo", help="train 5 tasks, publish, serve, and query with tritonclient",
        description="The main job: SupSup on 5 permuted-digits tasks, published to a registry, served on loopback, "
        "queried with the stock tritonclient with and without a task id; prints both accuracy tables.",
    )
    p.add_argument("--registry", default="demo-registry", help="registry directory (default ./demo-registry)")
    p.add_argument("--model", default="digits", help="model name (default digits)")
    p.add_argument("--tasks", type=int, default=5, help="number of permuted-digits tasks (default 5)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size of the queries (default 16)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maskbank", description="Continual-learning model serving: train, publish, serve.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(commands)
    _add_serve(commands)
    _add_demo(commands)
    from .registry_cli import add_registry_commands

    add_registry_commands(commands)
    return parser


def _train(args) -> None:
    import torch

    from registry import Registry
    from trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    config = {"density": args.density, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    requested = {"method": args.method, "stream": args.stream, "seed": args.seed, "architecture": args.arch,
                 "method_config": config}
    manifest = train(Registry(args.registry), args.model, args.tasks, requested)
    from trainer.metrics import format_matrix

    print(format_matrix(manifest.training["accuracy_matrix"], [t.name for t in manifest.tasks]))
    print(f"average accuracy {manifest.training['average_accuracy']:.3f}  forgetting "
          f"{manifest.training['forgetting']:.3f}  BWT {manifest.training['bwt']:.3f}")


def _serve(args) -> None:
    from serving import ServerConfig, serve_forever

    serve_forever(ServerConfig(
        registry=args.registry, host=args.host, port=args.port, poll_interval=args.poll_interval,
        task_inference=args.task_inference, cache_bytes=args.cache_bytes, workers=args.workers,
        torch_threads=args.threads,
    ))


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.registry, args.model, args.tasks, args.batch_size)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "registry":
            from .registry_cli import run_registry_command

            return run_registry_command(args)
        {"train": _train, "serve": _serve, "demo": _demo}[args.command](args)
    except MaskbankError as error:
        print(f"maskbank {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
