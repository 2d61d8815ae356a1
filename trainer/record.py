"""The training record `maskbank train` keeps in a model's manifest, read with its shape checked.

A manifest's checksum proves it was not damaged after publishing, not that its writer put the right
things in it: a record with a string for a metric or a ragged accuracy matrix ended in a traceback in
`report`, `registry show` and `train`. Every reader of the record goes through `training_record`.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from registry import Manifest, ManifestError

SUMMARY = ("average_accuracy", "forgetting", "bwt")  # numbers, always; "fwt" may be None
SETTINGS = {"method": (str, "text"), "stream": (str, "text"), "seed": (int, "a whole number"),
            "architecture": (dict, "an object"), "method_config": (dict, "an object")}


def training_record(manifest: Manifest) -> Mapping[str, Any] | None:
    """The manifest's training record, or None where it has none (a program of its own published the
    model, as bench/snapshot_memory.py does). ManifestError, naming the field, if it is malformed. Its
    accuracy matrix may cover fewer tasks than the model has, and its rows other tasks than 0..i:
    tasks published through the registry's API (bench/serving.py's synthetic ones) have no row of
    their own, though a later training measures them."""
    training = manifest.training
    if not {"settings", "accuracy_matrix"} <= set(training):
        return None
    problem = _problem(training, len(manifest.tasks))
    if problem is not None:
        raise ManifestError(f"model '{manifest.model}' generation {manifest.generation} has a malformed training "
                            f"record: {problem}")
    return training


def _problem(training: Mapping[str, Any], tasks: int) -> str | None:
    settings = training["settings"]
    if not isinstance(settings, dict):
        return f"settings are {_short(settings)}, not an object"
    for key, (kind, what) in SETTINGS.items():
        if not (isinstance(settings.get(key), kind) and not isinstance(settings.get(key), bool)):
            return f"settings' {key} is {_short(settings.get(key))}, not {what}"
    matrix = training["accuracy_matrix"]
    if not (isinstance(matrix, list) and 1 <= len(matrix) <= tasks and all(
            isinstance(row, list) and 1 <= len(row) <= tasks and all(map(_is_number, row)) for row in matrix)):
        return (f"accuracy_matrix {_short(matrix)} is not rows of accuracies, at most one row and one accuracy per "
                f"task of the {tasks} published")
    for key in SUMMARY:
        if not _is_number(training.get(key)):
            return f"{key} is {_short(training.get(key))}, not a number"
    if not (training.get("fwt") is None or _is_number(training["fwt"])):
        return f"fwt is {_short(training['fwt'])}, neither a number nor null"
    if not (training.get("fwt_tasks") is None or _is_int(training["fwt_tasks"])):
        return f"fwt_tasks is {_short(training['fwt_tasks'])}, neither a whole number nor null"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else f"{text[:77]}..."
