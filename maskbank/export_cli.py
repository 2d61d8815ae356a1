"""`maskbank export onnx | triton`: take a registry model out of Python."""

from __future__ import annotations

import sys

from registry import Registry
from registry.onnx_export import LAYOUTS, export_onnx

from .cli import given_path, local_path, positive_int, progress_bar

ONNX_HELP = """Writes DIR/backbone.onnx (the architecture's graph, input 'input' FP32 [N, features], output 'logits'
FP32 [N, the network's classes]: keep a task's first num_classes columns, as export.json lists them; every weight a
graph input named after the network's parameter, batch dimension dynamic) and,
per task, its effective weights (DIR/tasks/ID.safetensors, to feed as those inputs) or with --layout self-contained
a standalone model (DIR/tasks/ID.onnx, logits cut to the task's classes). DIR/export.json lists the tasks and
files. Every ONNX file passes onnx.checker."""

TRITON_HELP = """Writes one Triton model per task, REPO/MODEL.task-ID/config.pbtxt and
REPO/MODEL.task-ID/GENERATION/model.onnx (platform onnxruntime_onnx, dynamic batching). A Triton ONNX model cannot
take weights from outside at run time, so every task is its own self-contained model; the client picks the task by
picking the model. A model folder already there must be this model's export (or empty); versions above the generation
exported of the models written, and models of tasks the registry no longer lists, are removed (the registry went
back)."""


def add_export_commands(commands) -> None:
    p = commands.add_parser("export", help="export a registry model as ONNX files or a Triton model repository",
                            description="Export the newest generation of a registry model for ONNX Runtime, Triton "
                            "or any other ONNX consumer.")
    sub = p.add_subparsers(dest="export_command", required=True, metavar="FORMAT")
    onnx = sub.add_parser("onnx", help="the backbone graph once, plus each task's weights or a model per task",
                          description=ONNX_HELP)
    onnx.add_argument("--out", required=True, type=local_path, metavar="DIR", help="output folder (created if missing)")
    onnx.add_argument("--layout", choices=LAYOUTS, default=LAYOUTS[0],
                      help="per task: its weights for the shared graph (default), or a standalone ONNX model")
    triton = sub.add_parser("triton", help="a Triton model repository, one ONNX model per task", description=TRITON_HELP)
    triton.add_argument("--out", required=True, type=local_path, metavar="REPO", help="model repository folder (created if missing)")
    triton.add_argument("--max-batch-size", type=positive_int, default=1024,
                        help="Triton's max_batch_size, rows per batch of its dynamic batcher (default 1024)")
    for parser in (onnx, triton):
        parser.add_argument("model", help="model name in the registry")
        parser.add_argument("--registry", required=True, type=given_path, help="registry directory or URL")
        parser.add_argument("--task", dest="tasks", action="append", type=_task_key, default=[], metavar="ID",
                            help="a task id or name to export (repeatable; default: every task)")


def _task_key(text: str) -> int | str:
    return int(text) if text.isdigit() else text


def run_export_command(args) -> int:
    registry, progress = Registry(args.registry), progress_bar("exporting tasks", "task")
    registry.check_location()  # a mistyped path is no registry, not one without this model
    if args.export_command == "onnx":
        index = export_onnx(registry, args.model, args.out, args.tasks, layout=args.layout, progress=progress)
        print(f"wrote {index.parent} (index: {index})", file=sys.stderr)
    else:
        from serving.triton_export import export_triton

        export = export_triton(registry, args.model, args.out, args.tasks, max_batch_size=args.max_batch_size,
                               progress=progress)
        print(f"wrote {len(export.models)} Triton model(s) into {args.out}", file=sys.stderr)
        if export.withdrawn:
            print("removed what the registry no longer has (versions above the generation exported, models of tasks "
                  f"it does not list): {', '.join(str(path) for path in export.withdrawn)}", file=sys.stderr)
    return 0
