"""`maskbank registry ls | show | verify | gc | audit` on a real trained registry."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from maskbank.cli import main
from registry import Registry, RegistryError
from registry.audit import binary_entropy, impresslearn_cost

from .conftest import TINY, manifest_with, signed_manifest, train_model


@pytest.fixture
def trained(tmp_path) -> Registry:
    return train_model(tmp_path, "m", 2, TINY)


def run(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().out


def run_json(capsys, *args: str):
    code, out = run(capsys, *args, "--json")
    return code, json.loads(out)


def test_ls_and_show(trained, capsys):
    where = ["--registry", trained.location]
    code, models = run_json(capsys, "registry", "ls", *where)
    assert code == 0 and [(m["model"], m["generation"], m["tasks"]) for m in models] == [("m", 2, 2)]
    code, out = run(capsys, "registry", "show", "m", *where)
    assert code == 0 and "| 1 | perm-1 | supsup | 10 |" in out
    code, task = run_json(capsys, "registry", "show", "m", "perm-1", *where)
    assert task["id"] == 1 and task["parts"]["masks"]["codec"] in ("bitmask/v1", "entropy-mask/v1")
    assert main(["registry", "show", "m", "9", *where]) == 2
    assert "no task 9" in capsys.readouterr().err
    for generation in ("0", "-1"):  # not silently the newest
        assert main(["registry", "show", "m", "--generation", generation, *where]) == 2
        assert "--generation must be 1 or more (omit it for the newest)" in capsys.readouterr().err


def test_verify_finds_corruption_and_orphans(trained, capsys):
    where = ["--registry", trained.location]
    code, report = run_json(capsys, "registry", "verify", *where)
    assert code == 0 and report["ok"] and report["blobs_checked"] == 3 and report["orphans"] == []
    orphan = trained.put("tensors/v1", {})
    ref = trained.manifest("m").task(0).parts["masks"]
    path = Path(trained.blobs.describe(ref.digest))
    path.write_bytes(b"garbage")
    code, out = run(capsys, "registry", "verify", *where)
    assert code == 1
    assert f"PROBLEM (corrupt) {path}" in out and f"1 unreferenced blob(s) (harmless; `maskbank registry gc` " \
        f"removes them): {orphan.digest}\n" in out  # named, not only counted
    task = trained.manifest("m").task(0)
    assert f"(used by model 'm' task 0 ({task.name}) part masks)" in out  # what to republish
    _, report = run_json(capsys, "registry", "verify", *where)
    assert report["orphans"] == [orphan.digest]


def test_verify_reports_a_missing_blob_and_a_broken_manifest(trained, capsys):
    where = ["--registry", trained.location]
    ref = trained.manifest("m").task(1).parts["masks"]
    Path(trained.blobs.describe(ref.digest)).unlink()
    manifest_file = Path(trained.location) / "models" / "m" / "generations" / "0000000001.json"
    manifest_file.write_text(manifest_file.read_text()[:100])
    code, report = run_json(capsys, "registry", "verify", *where)
    kinds = sorted(p["kind"] for p in report["problems"])
    assert code == 1 and kinds == ["manifest", "missing"]
    assert main(["registry", "gc", *where]) == 2  # gc will not guess references
    assert "gc refused" in capsys.readouterr().err


def test_files_that_are_no_blob_are_reported_and_left_alone(trained, capsys):
    """A README or .DS_Store under blobs/ made gc fail ('malformed blob reference') while verify said OK."""
    where = ["--registry", trained.location]
    blobs = Path(trained.location) / "blobs" / "sha256"
    shard = next(p for p in blobs.iterdir() if p.is_dir())
    strays = [blobs / "zz" / "notahash", shard / "README", shard / (shard.name + "0" * 61 + "x"), blobs / "notes.txt",
              blobs.parent / "README"]
    for stray in strays:
        stray.parent.mkdir(exist_ok=True)
        stray.write_text("not a blob")
    code, out = run(capsys, "registry", "verify", *where)
    assert code == 0 and "5 file(s) or folder(s) under blobs/ that are no blob, left alone (remove them by hand)" in out
    code, report = run_json(capsys, "registry", "gc", "--grace-seconds", "0", *where)
    assert code == 0 and report["deleted"] == [] and all(stray.exists() for stray in strays)


def test_gc_refuses_to_delete_every_blob_when_no_manifest_is_there(trained, capsys, tmp_path):
    """With models/ not mounted (or not copied), every blob is unreferenced: gc deleted them all."""
    models = Path(trained.location) / "models"
    models.rename(tmp_path / "elsewhere")
    blobs = sorted(p for p in (Path(trained.location) / "blobs").rglob("*") if p.is_file())
    where = ["--grace-seconds", "0", "--registry", trained.location]
    for dry_run in (["--dry-run"], []):
        code, err = main(["registry", "gc", *dry_run, *where]), capsys.readouterr().err
        assert code == 2 and f"gc refused: no manifest in {trained.location} references any blob, yet it holds " \
            f"{len(blobs)} blob(s)" in err and "pass --delete-all-blobs" in err
    assert all(blob.exists() for blob in blobs)
    code, out = run(capsys, "registry", "verify", "--registry", trained.location)  # it said "gc removes them", then OK
    assert code == 1 and f"PROBLEM (missing) {Path(trained.location) / 'models'}: no manifest, yet {len(blobs)} blob(s): " \
        "a models/ folder not mounted" in out and "unreferenced" not in out
    code, report = run_json(capsys, "registry", "gc", "--delete-all-blobs", *where)
    assert code == 0 and len(report["deleted"]) == len(blobs) and not any(blob.exists() for blob in blobs)


def test_gc_leaves_a_folder_in_a_blobs_place_alone_and_goes_on(trained, capsys):
    """One candidate gc cannot delete (a folder where a blob would be) stopped gc before the others."""
    orphan = trained.put("tensors/v1", {"x": torch.arange(3.0)})
    folder = Path(trained.blobs.describe("sha256:" + "00" * 32))
    (folder / "inside").mkdir(parents=True)
    temporary = folder.parent / ".tmp-a-folder"  # named as a killed write's temporary: it stopped gc too
    temporary.mkdir()
    where = ["--grace-seconds", "0", "--registry", trained.location]
    for dry_run in (["--dry-run"], []):  # the dry run said it would delete the folder
        code, out = run(capsys, "registry", "gc", *dry_run, *where)
        assert code == 1 and "1 unreferenced blob(s) and 0 temporary file(s)" in out
        assert f"PROBLEM left alone: {folder}: a folder, not a file" in out
        assert f"PROBLEM left alone: {temporary}: a folder, not a file" in out
    assert not trained.storage.exists(trained.blobs.key(orphan.digest)) and folder.is_dir() and temporary.is_dir()
    code, report = run_json(capsys, "registry", "verify", *where[2:])  # it called the folder an unreferenced blob
    assert code == 0 and report["orphans"] == [] and report["leftovers"] == []
    assert {trained.blobs.key("sha256:" + "00" * 32), f"{trained.blobs.key('sha256:' + '00' * 32).rsplit('/', 1)[0]}/"
            ".tmp-a-folder"} <= set(report["strays"])


def test_verify_reports_every_unreadable_or_missing_file_and_gaps(trained, capsys):
    """An unreadable blob or manifest (here a directory where the file should be) ended verify with one
    OSError line, hiding the rest; a generation deleted from the middle of the history passed."""
    where = ["--registry", trained.location]
    manifest = trained.manifest("m")
    unreadable = Path(trained.blobs.describe(manifest.task(0).parts["masks"].digest))
    unreadable.unlink()
    unreadable.mkdir()
    Path(trained.blobs.describe(manifest.task(1).parts["masks"].digest)).unlink()
    code, report = run_json(capsys, "registry", "verify", *where)
    assert code == 1 and sorted(p["kind"] for p in report["problems"]) == ["missing", "unreadable"]
    assert any(p["where"] == str(unreadable) and "cannot be read (Is a directory)" in p["message"]
               for p in report["problems"])
    first = Path(trained.location) / "models" / "m" / "generations" / "0000000001.json"
    first.unlink()
    code, out = run(capsys, "registry", "verify", *where)
    assert code == 1 and "PROBLEM (missing) m generations: generation(s) 1 of 'm' are missing" in out
    assert main(["registry", "gc", "--grace-seconds", "0", *where]) == 2  # its blobs' users are unknown
    assert "generation(s) 1 of 'm' are missing" in capsys.readouterr().err


def test_blobs_a_damaged_manifest_may_use_are_not_called_harmless(trained, capsys):
    where = ["--registry", trained.location]
    newest = Path(trained.location) / "models" / "m" / "generations" / "0000000002.json"
    newest.write_text(newest.read_text()[:100])  # task 1's mask is referenced by it alone
    code, out = run(capsys, "registry", "verify", *where)
    assert code == 1 and "harmless" not in out
    assert "1 blob(s) no readable manifest references: the unreadable or missing manifests above may use them" in out


def test_gc_removes_the_temporary_files_of_killed_writes_after_the_grace_period(trained, capsys):
    """A publish killed mid-write leaves a .tmp- file beside the blobs (or manifests): nothing listed
    or removed it."""
    import os

    where = ["--registry", trained.location]
    shard = next(p for p in (Path(trained.location) / "blobs" / "sha256").iterdir())
    old, young = shard / ".tmp-killed", shard / ".tmp-writing"
    old.write_bytes(b"x" * 1000)
    young.write_bytes(b"y")
    os.utime(old, (1e9, 1e9))
    code, out = run(capsys, "registry", "verify", *where)
    assert code == 0 and "2 temporary file(s) of interrupted writes (harmless" in out
    code, report = run_json(capsys, "registry", "gc", "--grace-seconds", "3600", *where)
    assert report["leftovers_deleted"] == [f"blobs/sha256/{shard.name}/.tmp-killed"] and report["bytes_freed"] == 1000
    assert not old.exists() and young.exists()


def test_gc_deletes_only_old_unreferenced_blobs(trained, capsys):
    where = ["--registry", trained.location]
    orphan = trained.put("tensors/v1", {})
    code, report = run_json(capsys, "registry", "gc", *where)  # default grace: an hour
    assert code == 0 and report["deleted"] == [] and report["kept_recent"] == [orphan.digest]
    for bad in ("-5", "nan"):  # a negative or NaN grace period would spare nothing, not even a publish in progress
        assert main(["registry", "gc", "--grace-seconds", bad, *where]) == 2
        assert "gc refused: the grace period must be 0 seconds or more" in capsys.readouterr().err
    assert trained.blobs.exists(orphan.digest)
    code, report = run_json(capsys, "registry", "gc", "--grace-seconds", "0", "--dry-run", *where)
    assert report["deleted"] == [orphan.digest] and trained.blobs.exists(orphan.digest)
    code, report = run_json(capsys, "registry", "gc", "--grace-seconds", "0", *where)
    assert report["deleted"] == [orphan.digest] and not trained.blobs.exists(orphan.digest)
    assert main(["registry", "verify", *where]) == 0  # every referenced blob survived


def test_gc_reads_no_blob_between_its_age_check_and_its_delete(trained, monkeypatch):
    """gc read each candidate whole (for its size) after checking its age: on a large blob or a slow
    object store, a publish could adopt the blob meanwhile (writing it again makes it young) and gc
    deleted it anyway. The size now comes from metadata and the age is looked at last."""
    from registry.maintenance import collect_garbage

    orphan = trained.put("tensors/v1", {"w": torch.ones(3)})
    read = trained.storage.read
    blobs_read = []
    monkeypatch.setattr(trained.storage, "read", lambda key: blobs_read.append(key) or read(key))
    report = collect_garbage(trained, 0)
    assert report.deleted == [orphan.digest] and report.bytes_freed == orphan.size
    assert not [key for key in blobs_read if key.startswith("blobs/")]


def test_one_model_that_cannot_be_read_does_not_hide_the_others_from_ls(trained, capsys):
    """`registry ls` ended at the first unreadable manifest, listing nothing else."""
    train_model(trained.location, "n", 1, TINY)
    newest = Path(trained.location) / "models" / "m" / "generations" / "0000000002.json"
    newest.write_text(newest.read_text()[:100])
    code, out = run(capsys, "registry", "ls", "--registry", trained.location)
    assert code == 1 and "| n | 1 | 1 | supsup |" in out
    assert "PROBLEM model 'm': manifest " in out and "0000000002.json is unreadable" in out
    code, rows = run_json(capsys, "registry", "ls", "--registry", trained.location)
    assert code == 1 and [row["model"] for row in rows] == ["m", "n"] and "unreadable" in rows[0]["error"]


def test_a_folder_the_system_will_not_list_is_one_problem_for_verify_and_stops_gc(trained, monkeypatch):
    """A blob shard or a model's generations that cannot be listed (no permission: here the listing
    raises as the system would) ended verify with the system's error, hiding the rest of the check;
    gc, which must know every reference and every blob, refuses and names the folder."""
    from registry.maintenance import collect_garbage, verify

    shard = "blobs/sha256/" + trained.manifest("m").task(0).parts["masks"].digest.removeprefix("sha256:")[:2]
    listing = trained.storage.list_dir
    refused = {shard}

    def list_dir(prefix: str) -> list[str]:
        if prefix in refused:
            raise PermissionError(13, "Permission denied")
        return listing(prefix)

    monkeypatch.setattr(trained.storage, "list_dir", list_dir)
    report = verify(trained)
    assert [(p.kind, p.where) for p in report.problems] == [("unreadable", trained.storage.describe(shard))]
    assert report.blobs_checked == len(set(r.digest for m in (1, 2) for r in trained.manifest("m", m).blob_refs()))
    with pytest.raises(RegistryError, match=f"gc refused: {re.escape(trained.storage.describe(shard))} cannot be "
                                            r"listed \(Permission denied\); fix its permissions first"):
        collect_garbage(trained, 0)
    refused.add(trained.generations_prefix("m"))
    assert [p.kind for p in verify(trained).problems] == ["unreadable", "unreadable"]
    with pytest.raises(RegistryError, match="gc refused: the generations of model 'm' .* cannot be listed .Permission denied."):
        collect_garbage(trained, 0)


@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_generations_behind_a_broken_link_are_a_problem_not_an_empty_model(trained, capsys, tmp_path, link):
    """A model's generations folder that is a link leading nowhere (a loop; an unmounted volume) was
    listed as empty: verify said OK and gc deleted every blob of the model."""
    train_model(trained.location, "n", 1, TINY)
    generations = Path(trained.location) / "models" / "m" / "generations"
    kept = generations.rename(tmp_path / "kept")
    generations.symlink_to(generations if link == "loop" else tmp_path / "unmounted")
    where = ["--registry", trained.location]
    code, out = run(capsys, "registry", "verify", *where)
    assert code == 1 and "PROBLEM (unreadable) m generations: the generations of model 'm' (" in out
    assert main(["registry", "gc", "--grace-seconds", "0", *where]) == 2
    assert "gc refused: the generations of model 'm'" in capsys.readouterr().err
    code, out = run(capsys, "registry", "ls", *where)
    assert code == 1 and "| n | 1 | 1 | supsup |" in out and "PROBLEM model 'm': the generations of model 'm'" in out
    generations.unlink()
    kept.rename(generations)
    assert main(["registry", "verify", *where]) == 0  # nothing was deleted


def test_a_model_published_without_maskbank_train_gets_a_message_not_a_traceback(tmp_path, capsys):
    """A program of its own may publish through the registry's API with no training record
    (bench/snapshot_memory.py does): `report` and appending with `train` ended in a KeyError."""
    registry = Registry(tmp_path)
    registry.commit(manifest_with(registry, tasks=2))
    assert main(["report", "m", "--registry", str(tmp_path)]) == 2
    assert "model 'm' has no training record (it was published by a program of its own" in capsys.readouterr().err
    assert main(["train", "--tasks", "3", "--registry", str(tmp_path), "--model", "m"]) == 2
    assert "model 'm' has no training settings" in capsys.readouterr().err
    assert main(["registry", "show", "m", "--registry", str(tmp_path)]) == 0


@pytest.mark.parametrize("field, value, message", [
    ("accuracy_matrix", [[0.5], [0.5, 0.5, 0.7]], r"accuracy_matrix \[\[0.5\], \[0.5, 0.5, 0.7\]\] is not rows of "
                                                   r"accuracies, at most one row and one accuracy per task of the 2 "),
    ("bwt", "none", 'bwt is "none", not a number'),
    ("settings", [], r"settings are \[\], not an object"),
    ("settings", {"method": "supsup", "stream": "permuted-digits"}, "settings' seed is null, not a whole number"),
])
def test_a_malformed_training_record_is_said_not_a_traceback(trained, capsys, field, value, message):
    """A checksum cannot tell a writer's bug: a training record with a string for a number, a ragged
    matrix or settings that are no object ended in tracebacks in report, show, train and demo."""
    path = Path(trained.location) / "models" / "m" / "generations" / "0000000002.json"
    body = json.loads(path.read_text())["manifest"]
    path.write_text(signed_manifest({**body, "training": {**body["training"], field: value}}))
    where = ["--registry", trained.location]
    for command in (["report", "m"], ["train", "--tasks", "3", "--model", "m"], ["demo", "--model", "m"]):
        assert main([*command, *where]) == 2
        err = capsys.readouterr().err
        assert re.search(f"error: model 'm' generation 2 has a malformed training record: {message}", err), err
    code, out = run(capsys, "registry", "show", "m", *where)  # show still shows the tasks, and says what is wrong
    assert code == 0 and "| 1 | perm-1 | supsup |" in out and "has a malformed training record" in out
    assert trained.generations("m") == [1, 2]


def test_show_says_which_backbone_version_a_task_is_served_on(tmp_path, capsys):
    """SPG's tasks follow the newest backbone version; show gave only the version each was published with."""
    train_model(tmp_path, "m", 2, {**TINY, "method": "spg"}, stream="split-digits")
    code, out = run(capsys, "registry", "show", "m", "0", "--registry", str(tmp_path))
    assert code == 0 and "method spg, backbone version 2 (served on the newest, 3, as spg tasks are), 2 classes" in out
    code, out = run(capsys, "registry", "show", "m", "1", "--registry", str(tmp_path))
    assert code == 0 and "method spg, backbone version 3, 2 classes" in out


def test_tasks_published_through_the_api_after_training_make_no_malformed_record(trained, capsys):
    """bench/serving.py appends synthetic tasks through the registry's API: the accuracy matrix then has
    fewer rows than the model has tasks, which is out of date, not malformed. Appending to it with the
    trainer is refused: it scored those tasks on stream tasks they never learned, under wrong labels."""
    extra = dataclasses.replace(trained.manifest("m").tasks[-1], id=2, name="extra")
    trained.publish("m", lambda m: m.next(tasks=(*m.tasks, extra)))
    where = ["--registry", trained.location]
    assert main(["report", "m", *where]) == 0
    capsys.readouterr()
    assert main(["train", "--tasks", "4", "--model", "m", *where]) == 2  # it scored 'extra' on a stream task
    assert ("model 'm' has 3 tasks but its training record measured 2: the others were published without `maskbank "
            "train`") in capsys.readouterr().err
    assert len(trained.manifest("m").tasks) == 3


def test_audit_figures(trained, capsys, tmp_path):
    plot = tmp_path / "plots" / "audit.png"  # its folder is created
    code, result = run_json(capsys, "registry", "audit", "m", "--registry", trained.location, "--plot", str(plot))
    assert code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    weights = 64 * 32 + 32 * 10
    assert result["backbone_weights"] == weights and result["dense_model_bytes"] == 4 * weights
    for part in result["parts"]:
        mask = part["mask"]
        assert mask["weights"] == weights and mask["density"] == pytest.approx(0.5, abs=0.01)
        assert part["vs_dense"] == pytest.approx(4 * weights / part["bytes"])
        assert part["vs_entropy"] == pytest.approx(weights * binary_entropy(mask["density"]) / 8 / part["bytes"])
    assert result["registry_bytes"] == result["shared_bytes"] + sum(result["task_bytes"]) + result["state_bytes"]
    assert result["history_bytes"] == sum(p.stat().st_size for p in (Path(trained.location) / "blobs").rglob("*")
                                          if p.is_file())  # SupSup replaces nothing: every blob is in use


def test_the_audit_counts_what_earlier_generations_keep(tmp_path, capsys):
    """ImpressLearn's heterogeneous basis is replaced as tasks come: the blobs of the earlier bases stay
    (every generation keeps its blobs), and the audit counted only the newest generation's; its plot
    drew the newest generation's shared bytes from the first task on."""
    from trainer import train

    registry = Registry(tmp_path)
    on_disk = []
    for tasks in (1, 2):
        train(registry, "m", tasks, {"method": "impresslearn", "stream": "permuted-digits", "architecture": TINY["architecture"],
                                     "method_config": {"basis_size": 2, "mask_epochs": 1, "alpha_epochs": 1}}, log=lambda _: None)
        on_disk.append(sum(p.stat().st_size for p in (tmp_path / "blobs").rglob("*") if p.is_file()))
    code, result = run_json(capsys, "registry", "audit", "m", "--registry", str(tmp_path), "--plot", str(tmp_path / "a.png"))
    assert code == 0 and result["history_bytes"] == on_disk[-1] > result["registry_bytes"]
    assert result["growth"] == [[1, on_disk[0]], [2, on_disk[1]]]  # what --plot draws: it charged the newest basis at task 1
    first = tmp_path / "models" / "m" / "generations" / "0000000001.json"
    first.write_text(first.read_text()[:100])  # a damaged earlier generation stopped the audit of the newest
    code, out = run(capsys, "registry", "audit", "m", "--registry", str(tmp_path))
    assert code == 0 and "without generation(s) 1, which cannot be read (`maskbank registry verify` says why)" in out


def test_impresslearn_cost_matches_the_paper_example():
    # LeNet 300-100 (266,200 weights), |M| = 5 basis masks, 3 layers, 359 tasks: Cx about 67 (the paper's Table 2),
    # with a SupSup mask at density 0.1 counted as 16-bit indices.
    phi, cx = impresslearn_cost(mask_bytes=2 * 0.1 * 266_200, basis_size=5, layers=3, max_tasks=359)
    assert cx == pytest.approx(67, abs=1.5) and phi == pytest.approx(741.5 + 60, rel=1e-3)


def test_a_plot_that_cannot_be_written_is_an_error_not_a_traceback(trained, capsys, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    for command in (["report", "m"], ["registry", "audit", "m"]):
        code = main([*command, "--registry", trained.location, "--plot", str(tmp_path / "a-file" / "out.png")])
        assert code == 2  # it was [Errno 17] File exists: '.../a-file' (status 1)
        assert (f"maskbank {' '.join(command[:-1])}: error: cannot make a folder for {tmp_path / 'a-file' / 'out.png'}: "
                f"{tmp_path / 'a-file'} is a file, not a folder") in capsys.readouterr().err
        (tmp_path / "taken.png").mkdir(exist_ok=True)  # the system refuses the write itself: it was a bare errno, status 1
        assert main([*command, "--registry", trained.location, "--plot", str(tmp_path / "taken.png")]) == 2
        assert f"error: cannot write {tmp_path / 'taken.png'}: Is a directory" in capsys.readouterr().err
    monkeypatch.setenv("HOME", str(tmp_path))  # `--registry=~/reg`: the shell leaves the ~, and it made a folder '~'
    monkeypatch.chdir(tmp_path)  # where such a folder would go: not the working tree
    code, out = run(capsys, "registry", "ls", f"--registry=~/{Path(trained.location).relative_to(tmp_path)}")
    assert code == 0 and "| m |" in out
    assert main(["registry", "audit", "m", "--registry", trained.location, "--plot=~/home.png"]) == 0  # it wrote ./~/
    assert (tmp_path / "home.png").is_file() and f"wrote {tmp_path / 'home.png'}" in capsys.readouterr().err
    (tmp_path / "dangling").symlink_to(tmp_path / "unmounted")  # it said "File exists"
    assert main(["registry", "audit", "m", "--registry", trained.location, "--plot", str(tmp_path / "dangling" / "x.png")]) == 2
    assert f"{tmp_path / 'dangling'} is a link to {tmp_path / 'unmounted'}, which does not exist" in capsys.readouterr().err
    for command in (["registry", "audit", "m", "--plot"], ["export", "onnx", "m", "--out"], ["export", "triton", "m", "--out"]):
        with pytest.raises(SystemExit) as refused:  # an unset variable read as the current folder
            main([*command, "", "--registry", trained.location])
        assert refused.value.code == 2 and "an empty path (an unset variable?)" in capsys.readouterr().err
        for url in ("s3://bucket/out.png", "filecache::s3://bucket/out.png", "file://host/out.png"):
            with pytest.raises(SystemExit) as refused:  # it wrote ./s3:/bucket/out and said it wrote s3://bucket/out
                main([*command, url, "--registry", trained.location])
            assert refused.value.code == 2 and f"{url} is a URL; this writes to a local path" in capsys.readouterr().err
    assert main(["registry", "audit", "m", "--registry", trained.location, "--plot", f"file://{tmp_path}/url.png"]) == 0
    assert (tmp_path / "url.png").is_file()
    assert main(["registry", "audit", "m", "--registry", trained.location, "--plot", "file://~/tilde.png"]) == 0
    assert (tmp_path / "tilde.png").is_file()  # HOME is tmp_path here: it wrote a folder named '~


def test_a_plot_is_written_where_the_command_says(trained, capsys, tmp_path):
    """A name without an extension gets '.png', and the message names that file; an extension
    matplotlib cannot write is refused before any work; svg is drawn as svg."""
    for command in (["report", "m"], ["registry", "audit", "m"]):
        assert main([*command, "--registry", trained.location, "--plot", str(tmp_path / command[-2])]) == 0
        written = tmp_path / f"{command[-2]}.png"
        assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {written}\n" in capsys.readouterr().err
        with pytest.raises(SystemExit) as refused:
            main([*command, "--registry", trained.location, "--plot", str(tmp_path / "out.xyz")])
        assert refused.value.code == 2
        assert "argument --plot: cannot draw a '.xyz' file; name one ending in .avif, .eps" in capsys.readouterr().err
    assert main(["report", "m", "--registry", trained.location, "--plot", str(tmp_path / "m.svg")]) == 0
    assert b"<svg" in (tmp_path / "m.svg").read_bytes()[:500]
    assert not (tmp_path / "out.xyz").exists()


def test_a_registry_directory_that_does_not_exist_is_an_error_not_an_empty_registry(tmp_path, capsys):
    missing = str(tmp_path / "typo")
    for action in ("ls", "verify", "gc"):
        assert main(["registry", action, "--registry", missing]) == 2
        assert f"maskbank registry {action}: error: no registry at {missing}: the directory does not exist" in capsys.readouterr().err
    for command in (["report", "m"], ["export", "onnx", "m", "--out", str(tmp_path / "out")]):  # not "no model 'm'"
        assert main([*command, "--registry", missing]) == 2
        assert f"error: no registry at {missing}: the directory does not exist" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    (tmp_path / "empty").mkdir()  # an existing, empty registry is one: nothing wrong in it
    assert main(["registry", "verify", "--registry", str(tmp_path / "empty")]) == 0
    (tmp_path / "empty" / "lost+found").mkdir()  # a fresh volume's, and a placeholder: still an empty registry
    (tmp_path / "empty" / ".keep").write_text("")
    assert main(["registry", "verify", "--registry", str(tmp_path / "empty")]) == 0
    (tmp_path / "empty" / "notes.txt").write_text("a folder of other things verified OK too")
    assert main(["registry", "verify", "--registry", str(tmp_path / "empty")]) == 2
    assert "no registry at {}: the directory holds other things and no models/ or blobs/ folder".format(
        tmp_path / "empty") in capsys.readouterr().err


def test_a_registry_train_cannot_write_is_refused_before_training(tmp_path, capsys, monkeypatch):
    """It was found after the first task had trained, as '[Errno 20] Not a directory', status 1."""
    (tmp_path / "afile").write_text("")
    command = ["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "1", "--model", "m"]
    monkeypatch.setattr("trainer.loop._new_model", lambda *a, **k: pytest.fail("trained before checking the registry"))
    assert main([*command, "--registry", str(tmp_path / "afile" / "reg")]) == 2
    assert (f"error: cannot publish to registry {tmp_path / 'afile' / 'reg'}: {tmp_path / 'afile'} is a file, not a "
            "folder") in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_verify_and_gc_report_progress_over_their_blobs(trained):
    from registry.maintenance import collect_garbage, verify

    totals = []

    def progress(items, total):
        totals.append(total)
        return items

    report = verify(trained, progress)
    trained.put("tensors/v1", {"orphan": torch.ones(1)})
    collected = collect_garbage(trained, 0, dry_run=True, progress=progress)
    assert totals == [report.blobs_checked, 1] and len(collected.deleted) == 1


def test_a_registry_path_that_is_a_file_is_refused_by_every_command(tmp_path, capsys):
    """It failed deep inside ("Not a directory: 'afile/blobs/sha256/5d'"), or was called missing
    with the advice that training would create it."""
    path = tmp_path / "afile"
    path.write_text("not a registry")
    message = f"registry {path} is a file, not a directory: give a directory (created on the first publish) or an fsspec URL"
    with pytest.raises(RegistryError, match=re.escape(message)):
        Registry(path)
    for command in (["registry", "ls"], ["report", "m"], ["train", "--method", "supsup", "--stream", "permuted-digits",
                                                          "--tasks", "1", "--model", "m"]):
        assert main([*command, "--registry", str(path)]) == 2
        assert message in capsys.readouterr().err
    assert path.read_text() == "not a registry"


def test_a_model_folder_train_cannot_write_is_refused_before_training(trained, tmp_path, capsys, monkeypatch):
    """Only the registry's own folders were tried: a model whose generations/ folder belongs to another
    user trained a task, then failed with '[Errno 13] Permission denied' and left orphan blobs; a registry
    in a folder that cannot be made (a read-only parent) was an UnboundLocalError traceback."""
    import shutil
    import tempfile

    registry = shutil.copytree(trained.location, tmp_path / "reg")
    generations = registry / "models" / "m" / "generations"
    temporary_file = tempfile.TemporaryFile

    def refused_in(folder):
        def temporary(*args, dir=None, **kwargs):
            if Path(dir) == folder:
                raise PermissionError(13, "Permission denied")
            return temporary_file(*args, dir=dir, **kwargs)
        return temporary

    monkeypatch.setattr("trainer.loop._load_model", lambda *a, **k: pytest.fail("trained before checking the registry"))
    monkeypatch.setattr(tempfile, "TemporaryFile", refused_in(generations))
    assert main(["train", "--tasks", "3", "--model", "m", "--registry", str(registry)]) == 2
    assert (f"error: cannot publish to registry {registry}: {generations} cannot be written (Permission denied)"
            in capsys.readouterr().err)
    monkeypatch.setattr(Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    command = ["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "1", "--model", "n"]
    assert main([*command, "--registry", str(tmp_path / "ro" / "sub")]) == 2
    assert (f"error: cannot publish to registry {tmp_path / 'ro' / 'sub'}: {tmp_path} cannot be written (Permission "
            "denied)") in capsys.readouterr().err
