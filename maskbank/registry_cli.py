"""`maskbank registry ls | show | verify | gc | audit`: inspect and maintain a registry."""

from __future__ import annotations

import dataclasses
import json
import sys

from registry import ManifestError, MaskbankError, Registry, RegistryError, UnknownName, served_backbone
from registry.audit import audit, format_audit, plot_audit
from registry.maintenance import collect_garbage, verify

from .cli import given_path, plot_file, progress_bar


def add_registry_commands(commands) -> None:
    p = commands.add_parser("registry", help="inspect, verify, clean and audit a registry",
                            description="Inspect and maintain a registry (a directory or an fsspec URL such as s3://bucket/prefix).")
    sub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    common = dict(type=given_path, help="registry directory or URL")

    ls = sub.add_parser("ls", help="list models with their newest generation, tasks and bytes")
    show = sub.add_parser("show", help="describe a model's newest generation, or one task")
    show.add_argument("model")
    show.add_argument("task", nargs="?", help="task id or name")
    show.add_argument("--generation", type=int, help="a generation other than the newest")
    check = sub.add_parser("verify", help="re-hash and decode every blob, read every manifest, find orphans; "
                           "exit 1 if anything is corrupt, missing or unreadable")
    gc = sub.add_parser("gc", help="delete blobs no generation references (older than the grace period)")
    gc.add_argument("--grace-seconds", type=float, default=3600.0,
                    help="keep unreferenced blobs younger than this, as a publish may be in progress (default 3600)")
    gc.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    gc.add_argument("--delete-all-blobs", action="store_true",
                    help="delete the blobs even when no manifest references any (refused by default: a models/ "
                    "folder not mounted or not copied looks the same)")
    aud = sub.add_parser("audit", help="bytes per task and artifact kind against dense, 16-bit-index, entropy and zstd/lzma references")
    aud.add_argument("model")
    aud.add_argument("--plot", metavar="FILE.png", type=plot_file,
                     help="draw bytes per task and cumulative size vs one dense model per task (png, or the format of "
                     "the file's extension: svg, pdf, ...)")
    for parser in (ls, show, check, gc, aud):
        parser.add_argument("--registry", required=True, **common)
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def run_registry_command(args) -> int:
    registry = Registry(args.registry)
    registry.check_location()  # a mistyped path would otherwise list no models and verify "OK"
    return {"ls": _ls, "show": _show, "verify": _verify, "gc": _gc, "audit": _audit}[args.registry_command](registry, args)


def _emit(args, data, text: str) -> None:
    print(json.dumps(data, indent=2, default=_plain) if args.json else text)


def _plain(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return dict(value)


def _ls(registry: Registry, args) -> int:
    """The models with their newest generation; one whose newest manifest cannot be read is listed with
    why (it hid every other model: the command ended at its error), and the status is then 1."""
    rows, empty = [], []
    for model in registry.list_models():
        try:
            manifest = registry.find_manifest(model)
        except MaskbankError as error:
            rows.append({"model": model, "error": str(error)})
            continue
        if manifest is None:  # a first publish under way, or a stray entry: not a model (yet), not an error
            empty.append(model)
            continue
        rows.append({"model": model, "generation": manifest.generation, "tasks": len(manifest.tasks),
                     "methods": sorted({t.method for t in manifest.tasks}),
                     "bytes": sum(r.size for r in manifest.blob_refs())})
    listed = [r for r in rows if "error" not in r]
    lines = ["| model | generation | tasks | methods | bytes |", "|---|---|---|---|---|"] + [
        f"| {r['model']} | {r['generation']} | {r['tasks']} | {', '.join(r['methods'])} | {r['bytes']:,} |" for r in listed
    ] if listed else [f"registry {registry.location} has no models"] if not rows else []
    lines += [f"PROBLEM model '{r['model']}': {r['error']} (`maskbank registry verify` checks everything)"
              for r in rows if "error" in r]
    if empty:
        lines.append(f"(no generation in {', '.join(map(repr, empty))} under models/: a first publish under way, or "
                     "not a model)")
    text = "\n".join(lines)
    _emit(args, rows, text)
    return 1 if len(listed) < len(rows) else 0


def _show(registry: Registry, args) -> int:
    if args.generation is not None and args.generation < 1:  # the registry reads 0 as "the newest"
        raise RegistryError(f"--generation must be 1 or more (omit it for the newest), got {args.generation}")
    manifest = registry.manifest(args.model, args.generation)
    if args.task is not None:
        task = manifest.task(int(args.task) if args.task.isdigit() else args.task)
        text = "\n".join([f"task {task.id} ({task.name}) of '{manifest.model}' generation {manifest.generation}",
                          f"method {task.method}, backbone version {task.backbone}{_served_on(manifest, task)}, "
                          f"{task.num_classes} classes" + (f", labels {json.dumps(list(task.labels), ensure_ascii=False)}"
                                                            if task.labels else ""),
                          "parts:"] + [f"  {name}: {ref.codec}, {ref.size:,} bytes, {ref.digest}" for name, ref in task.parts.items()]
                         + [f"metrics: {json.dumps(dict(task.metrics))}"])
        _emit(args, task, text)
        return 0
    lines = [f"model '{manifest.model}' generation {manifest.generation} (format {manifest.format_version})",
             f"architecture {json.dumps(dict(manifest.architecture))}, input shape {list(manifest.input_shape)}",
             "backbone versions: " + ", ".join(f"{v} ({b.blob.codec}, {b.blob.size:,} bytes"
                                               + (f", delta of {b.base}" if b.base else "") + ")" for v, b in manifest.backbones.items()),
             "", "| id | name | method | classes | bytes | accuracy when learned |", "|---|---|---|---|---|---|"]
    for t in manifest.tasks:
        accuracy = t.metrics.get("accuracy")
        lines.append(f"| {t.id} | {t.name} | {t.method} | {t.num_classes} | {sum(r.size for r in t.parts.values()):,} | "
                     f"{_accuracy(accuracy)} |")
    lines += _training_summary(manifest)
    _emit(args, manifest, "\n".join(lines))
    return 0


def _served_on(manifest, task) -> str:
    """Where a task runs on another backbone version than its own (SPG, EWC, fine-tuning follow the newest)."""
    try:
        served = served_backbone(task.method, task.backbone, manifest.backbones)
    except UnknownName:  # a plugin's method, its module not loaded: its own version is all that is known
        return ""
    return "" if served == task.backbone else f" (served on the newest, {served}, as {task.method} tasks are)"


def _accuracy(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, (int, float)) else json.dumps(value)[:40]


def _training_summary(manifest) -> list[str]:
    """The summary of the training record, if the model has one: a malformed record is said, not a
    traceback, since show is where a person looks at a model that other commands refuse."""
    from trainer.record import training_record

    try:
        training = training_record(manifest)
    except ManifestError as error:
        return [f"\n{error}"]
    if training is None:
        return []
    return [f"\naverage accuracy {training['average_accuracy']:.3f}, forgetting {training['forgetting']:.3f}, "
            f"BWT {training['bwt']:.3f}; settings {json.dumps(training['settings'])}"]


def _verify(registry: Registry, args) -> int:
    report = verify(registry, progress_bar("verifying blobs", "blob"))
    lines = [f"checked {sum(report.generations.values())} generation(s) of {len(report.generations)} model(s) "
             f"and {report.blobs_checked} blob(s) in {registry.location}"]
    lines += [f"PROBLEM ({p.kind}) {p.where}: {p.message}" for p in report.problems]
    if report.orphans and report.manifests_complete and report.generations:
        lines.append(f"{len(report.orphans)} unreferenced blob(s) (harmless; `maskbank registry gc` removes them): "
                     + _first(report.orphans))
    elif report.orphans and not report.manifests_complete:
        lines.append(f"{len(report.orphans)} blob(s) no readable manifest references: the unreadable or missing "
                     "manifests above may use them, so restore those before `maskbank registry gc` (it refuses until then)")
    if report.leftovers:
        lines.append(f"{len(report.leftovers)} temporary file(s) of interrupted writes (harmless; `maskbank registry gc` "
                     "removes them)")
    if report.strays:
        lines.append(f"{len(report.strays)} file(s) or folder(s) under blobs/ that are no blob, left alone (remove them by "
                     f"hand): {_first(report.strays)}")
    lines.append("OK" if report.ok else f"{len(report.problems)} problem(s) found")
    _emit(args, {**dataclasses.asdict(report), "ok": report.ok}, "\n".join(lines))
    return 0 if report.ok else 1


def _first(names: list[str], shown: int = 5) -> str:
    """The first few of `names`, and '...' for the rest (the whole list is in --json)."""
    return ", ".join(names[:shown]) + (", ..." if len(names) > shown else "")


def _gc(registry: Registry, args) -> int:
    report = collect_garbage(registry, args.grace_seconds, args.dry_run,
                             progress_bar("checking unreferenced blobs", "blob"), delete_all=args.delete_all_blobs)
    verb = "would delete" if args.dry_run else "deleted"
    text = (f"{verb} {len(report.deleted)} unreferenced blob(s) and {len(report.leftovers_deleted)} temporary file(s) "
            f"of interrupted writes, {report.bytes_freed:,} bytes; kept {len(report.kept_recent)} blob(s) younger than "
            f"{args.grace_seconds:g} s")
    text += "".join(f"\nPROBLEM left alone: {what}" for what in report.left_alone)
    _emit(args, {**dataclasses.asdict(report), "dry_run": args.dry_run}, text)
    return 1 if report.left_alone else 0


def _audit(registry: Registry, args) -> int:
    result = audit(registry, args.model)
    if args.plot:
        plot_audit(result, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    _emit(args, result.to_dict(), format_audit(result))
    return 0
