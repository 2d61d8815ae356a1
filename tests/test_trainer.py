"""The trainer: streams, SupSup, metrics, and appending tasks to a published model."""

import contextlib
import re

import pytest
import torch
from torch.nn.utils import parametrize

from registry import MaskbankError, Registry, build_architecture
from trainer import TrainingContext, TrainingError, get_method, get_stream
from trainer.loop import task_generator
from trainer.metrics import backward_transfer, forgetting, summary
from trainer.supsup import EdgePopupMask

from .conftest import TINY, train_model


def test_metrics_on_a_known_matrix():
    matrix = [[0.9], [0.8, 0.7], [0.6, 0.75, 0.5]]
    assert summary(matrix)["average_accuracy"] == pytest.approx((0.6 + 0.75 + 0.5) / 3)
    assert forgetting(matrix) == pytest.approx(((0.9 - 0.6) + (0.7 - 0.75)) / 2)
    assert backward_transfer(matrix) == pytest.approx(((0.6 - 0.9) + (0.75 - 0.7)) / 2)
    assert forgetting([[0.5]]) == backward_transfer([[0.5]]) == 0.0


def test_streams_are_deterministic_and_independent_of_length():
    a, b = get_stream("permuted-digits", seed=3), get_stream("permuted-digits", seed=3)
    assert torch.equal(a.task(4).x_train, b.task(4).x_train)
    assert not torch.equal(a.task(0).x_train, a.task(1).x_train)
    assert sorted(a.task(0).x_train[0].tolist()) == sorted(a.task(1).x_train[0].tolist())  # same pixels, permuted
    split = get_stream("split-digits")
    assert [split.task(i).num_classes for i in range(5)] == [2] * 5
    assert set(split.task(2).y_train.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="tasks 0..4, not 5"):
        split.task(5)


def test_edge_popup_mask_keeps_the_density_and_passes_gradients_straight_through():
    layer = torch.nn.Linear(20, 10, bias=False)
    mask = EdgePopupMask(layer.weight.shape, density=0.3, generator=torch.Generator().manual_seed(0))
    parametrize.register_parametrization(layer, "weight", mask)
    assert int(mask.mask().sum()) == 60
    layer(torch.randn(4, 20)).sum().backward()
    assert mask.scores.grad is not None and mask.scores.grad.abs().sum() > 0


def test_supsup_learns_a_task_without_touching_the_backbone():
    method = get_method("supsup", epochs=5)
    module = build_architecture({"arch": "mlp", "sizes": [64, 128, 10]})
    backbone = method.create_backbone(module, task_generator(0, 99))
    before = {k: v.clone() for k, v in backbone.items()}
    context = TrainingContext(architecture={}, backbone=backbone, tasks=[], shared={})
    artifact = method.learn_task(module, get_stream("permuted-digits").task(0), task_generator(0, 0), context)
    masks = artifact.parts["masks"]
    assert all(torch.equal(backbone[k], before[k]) for k in backbone)
    assert masks.keys() == backbone.keys() and all(m.dtype == torch.bool for m in masks.values())
    assert artifact.metrics["density"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("method, option, value, message", [
    ("supsup", "epochs", "abc", "must be an integer, got 'abc'"),
    ("supsup", "epochs", 1.5, "must be an integer, got 1.5"),
    ("supsup", "epochs", True, "must be an integer, got True"),
    ("supsup", "density", "0.5", "must be a number, got '0.5'"),
    ("supsup", "mask", [3], "must be text, got \\[3\\]"),
    ("cl-lsg", "target", True, "must be a number, got True"),
])
def test_method_options_of_the_wrong_type_are_refused_by_name(method, option, value, message):
    from registry.errors import MaskbankError

    with pytest.raises(MaskbankError, match=f"option '{option}' of method '{method}' {message}"):
        get_method(method, **{option: value})


@pytest.mark.parametrize("method, option, value, message", [
    ("supsup", "density", 1.5, "density must be in (0, 1], got 1.5"),
    ("supsup", "lr", -1.0, "lr must be > 0, got -1.0"),
    ("supsup", "batch_size", 0, "batch_size must be >= 1, got 0"),
    ("supsup", "momentum", 1.0, "momentum must be in [0, 1), got 1.0"),
    ("supsup", "epochs", 0, "epochs must be >= 1, got 0"),  # untrained masks, below chance, were published
    ("spg", "epochs", 0, "epochs must be >= 1, got 0"),
    ("packnet-share", "epochs", 0, "epochs must be >= 1, got 0"),
    ("impresslearn", "alpha_epochs", 0, "alpha_epochs must be >= 1, got 0"),
    ("exssnet", "epochs", -1, "epochs must be >= 0, got -1"),  # 0 with --kkt: the transferred scores
    ("exssnet", "weight_lr", 0.0, "weight_lr must be > 0, got 0.0"),
    ("impresslearn", "alpha_lr", -0.1, "alpha_lr must be > 0, got -0.1"),
    ("packnet-share", "finetune_lr", 0.0, "finetune_lr must be > 0, got 0.0"),
    ("spg", "lr", 0.0, "lr must be > 0, got 0.0"),
    ("ewc", "penalty", -1.0, "penalty must be >= 0, got -1.0"),
    ("cl-lsg", "mask_lr", -1.0, "mask_lr must be > 0, got -1.0"),
    ("packnet-share", "score_samples", 1, "score_samples must be >= 2, got 1"),
])
def test_method_options_out_of_range_are_refused_by_name(method, option, value, message):
    from registry.errors import MaskbankError

    with pytest.raises(MaskbankError) as refused:
        get_method(method, **{option: value})
    assert str(refused.value).startswith(f"method '{method}': {message}")


def test_exssnet_refuses_a_config_that_trains_nothing():
    """0 mask epochs is a task with --kkt (the transferred scores); without it, and with no weight epochs, an
    untrained task was published."""
    from registry.errors import MaskbankError

    with pytest.raises(MaskbankError, match="epochs and weight_epochs are both 0 and kkt is off: nothing would be trained"):
        get_method("exssnet", epochs=0, weight_epochs=0)
    assert get_method("exssnet", epochs=0, weight_epochs=0, kkt=True).config.kkt


@pytest.mark.parametrize("option, value", [("lr", float("nan")), ("lr", float("inf")), ("lr", 1e300), ("target", float("nan"))])
def test_numbers_training_cannot_compute_with_are_refused_by_name(option, value):
    """`--lr inf` trained NaN scores into masks of nothing learned (and published them); `--lr 1e300`,
    finite to Python, overflowed float32 deep in the optimizer, with a traceback."""
    from registry.errors import MaskbankError

    method = "cl-lsg" if option == "target" else "supsup"
    with pytest.raises(MaskbankError, match=re.escape(
            f"option '{option}' of method '{method}' must be a finite number within float32's range (+-3.4e+38: "
            f"training computes in float32), got {value!r}")):
        get_method(method, **{option: value})


def test_text_options_take_what_json_read_as_a_number():
    """`--set share=0` was refused ('must be text, got 0') though `--share 0` works: --set reads JSON first."""
    assert get_method("packnet-share", share=0).config.share == "0"



def test_train_refuses_an_option_out_of_range_in_one_line_before_any_work(capsys, tmp_path, monkeypatch):
    from maskbank.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "1", "--registry", "reg",
                 "--model", "m", "--density", "1.5"])
    err = capsys.readouterr().err
    assert code == 2 and err == "maskbank train: error: method 'supsup': density must be in (0, 1], got 1.5\n"
    assert not any(tmp_path.iterdir())  # no registry started


def test_an_option_that_would_do_nothing_is_refused_in_one_line_before_any_work(capsys, tmp_path, monkeypatch):
    """--density with --mask sign was accepted and silently ignored: a sign mask keeps the weights whose
    score is >= 0, however dense that is. Its default (0.5, kept in the model's settings) is no clash."""
    from maskbank.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "1", "--registry", "reg",
                 "--model", "m", "--mask", "sign", "--density", "0.2"])
    err = capsys.readouterr().err
    assert code == 2 and err == ("maskbank train: error: method 'supsup': option 'density' has no effect with "
                                 "mask='sign' (a sign mask keeps the weights whose score is >= 0); omit it\n")
    assert not any(tmp_path.iterdir())
    assert get_method("supsup", mask="sign").config.density == 0.5
    assert get_method("supsup", mask="topk", density=0.2).config.density == 0.2
    # without --density a sign model trains and appends: its stored settings hold the default density
    train = ["train", "--registry", "reg", "--model", "m", "--arch", '{"arch": "mlp", "sizes": [64, 32, 10]}']
    assert main([*train, "--method", "supsup", "--stream", "permuted-digits", "--mask", "sign", "--epochs", "1",
                 "--tasks", "1"]) == 0
    assert main([*train, "--tasks", "2"]) == 0
    assert main([*train, "--tasks", "3", "--density", "0.5"]) == 2  # same as stored, yet does nothing
    assert "option 'density' has no effect with mask='sign'" in capsys.readouterr().err
    assert len(Registry(tmp_path / "reg").manifest("m").tasks) == 2
    for method, given, message in [  # accepted and ignored before
        ("exssnet", ["--set", "kkt_k=3"], "option 'kkt_k' has no effect with kkt=False (KKT is off: pass --kkt)"),
        ("impresslearn", ["--basis", "random", "--set", "mask_epochs=9"],
         "option 'mask_epochs' has no effect with basis='random' (random basis masks are drawn, not trained)"),
        ("cl-lsg", ["--set", "target=0.9", "--set", "scratch_epochs=2"],
         "option 'scratch_epochs' has no effect with target=0.9 (the target is given, so no from-scratch model is "
         "trained)")]:
        assert main(["train", "--method", method, "--stream", "permuted-digits", "--tasks", "1", "--registry", "new",
                     "--model", "m", *given]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "new").exists()
    assert main(["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "1", "--registry", "new",
                 "--model", "m", "--epochs", "1", "--set", "epochs=3"]) == 2  # the --set won, silently
    assert "--epochs 1 and --set epochs=3 disagree: give one" in capsys.readouterr().err
    assert main(["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "1", "--registry", "new",
                 "--model", "m", "--set", "epochs=0", "--set", "epochs=2"]) == 2  # the second won, silently
    assert "--set epochs=0 and --set epochs=2 disagree: give one" in capsys.readouterr().err
    assert main(["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "1", "--registry", "r",
                 "--model", "m", "--epochs", "1", "--set", "epochs=null"]) == 2
    assert "--epochs 1 and --set epochs=null disagree: give one" in capsys.readouterr().err  # it said epochs=None
    for given, message in [(["--epochs", str(10**20)], "option 'epochs' of method 'supsup' must be at most 2,147,483,647"),
                           (["--threads", str(10**20)], "argument --threads: expected at most 1024 threads")]:
        with contextlib.suppress(SystemExit):  # argparse's refusals exit 2 themselves; the method's return 2
            assert main(["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "1", "--registry",
                         "new", "--model", "m", *given]) == 2  # tracebacks (OverflowError, in tqdm and in torch)
        assert message in capsys.readouterr().err


def test_method_options_take_an_integer_for_a_number_and_none_for_the_default():
    assert get_method("supsup", density=1).config.density == 1.0
    assert isinstance(get_method("supsup", density=1).config.density, float)
    assert get_method("cl-lsg", target=0.9).config.target == 0.9
    assert get_method("supsup", epochs=None).config.epochs == get_method("supsup").config.epochs


def test_option_types_the_check_does_not_know_are_left_to_the_config():
    from trainer.methods import _typed

    assert _typed("plugin", "layers", list[int], [1, 2]) == [1, 2]
    assert _typed("plugin", "scale", float | None, 2) == 2.0


@pytest.mark.parametrize("architecture, message", [
    ({"arch": "mlp", "sizes": [10, 32, 10]},
     "does not take stream 'permuted-digits': its examples are 64 features (images of 1x8x8), so its input size must "
     "be 64 (\"sizes\"[0] of an mlp, \"in_features\" of lenet300-100, \"input_shape\" of the image networks) (mat1 and mat2"),
    ({"arch": "cnn", "input_shape": [1, 7, 7]},
     "reads the examples as 1x7x7 images, but stream 'permuted-digits' has images of 1x8x8 (channels x height x width)"),
    ({"arch": "cnn", "input_shape": [4, 4, 4]},  # as many features, scrambled into the wrong images: it trained
     "reads the examples as 4x4x4 images, but stream 'permuted-digits' has images of 1x8x8"),
    ({"arch": "mlp", "sizes": [64, 32, 3]},
     "has 3 outputs, but the tasks of stream 'permuted-digits' have up to 10 classes: make its last layer"),
])
def test_an_architecture_that_does_not_fit_the_stream_is_refused_before_anything_is_written(tmp_path, architecture,
                                                                                              message):
    from trainer.loop import TrainingError

    with pytest.raises(TrainingError, match=re.escape(message)):
        train_model(tmp_path / "reg", "m", 1, {"architecture": architecture})
    assert not Registry(tmp_path / "reg").list_models()
    assert not any(path.is_file() for path in (tmp_path / "reg").rglob("*"))  # not even the backbone's blob



def test_a_model_published_with_another_image_shape_can_still_be_appended_to(tmp_path, monkeypatch):
    """Models trained before the image-shape check, as [4, 4, 4] on 1x8x8 digits, were refused on
    append, with advice ('give [1, 8, 8]') that the settings clash check then refused too."""
    from trainer import train
    from trainer.loop import TrainingError

    scrambled = {"arch": "cnn", "input_shape": [4, 4, 4], "width": 4}
    with pytest.raises(TrainingError, match="reads the examples as 4x4x4 images"):
        train_model(tmp_path, "m", 1, {"architecture": scrambled})
    registry = Registry(tmp_path)
    settings = {"method": "supsup", "stream": "permuted-digits", "architecture": scrambled, "method_config": {"epochs": 1}}
    with monkeypatch.context() as patched:  # published as the code before the check did
        patched.setattr("trainer.loop.check_fits", lambda *args, **kwargs: None)
        train(registry, "m", 1, settings, log=lambda _: None)
    assert len(train(registry, "m", 2, {}, log=lambda _: None).tasks) == 2

def test_a_data_root_a_built_in_stream_does_not_use_is_said_not_silently_ignored(tmp_path):
    from trainer import train

    lines = []
    train(Registry(tmp_path), "m", 1, {"method": "supsup", "stream": "permuted-digits", **TINY,
                                       "data_root": str(tmp_path / "data")}, log=lines.append)
    assert lines[0] == (f"note: --data-root {tmp_path / 'data'} is not used: stream 'permuted-digits' is built in, "
                        "with no files to read")
    assert Registry(tmp_path).manifest("m").training["settings"]["data_root"] is None  # nor kept in the model


def test_training_publishes_every_task_with_metrics(tmp_path):
    registry = train_model(tmp_path, "m", 2, TINY)
    manifest = registry.manifest("m")
    assert registry.generations("m") == [1, 2] and [t.name for t in manifest.tasks] == ["perm-0", "perm-1"]
    assert len(manifest.training["accuracy_matrix"]) == 2
    assert all(t.metrics["accuracy"] > 0.3 for t in manifest.tasks)  # far above chance (0.1) even when tiny
    assert all(t.metrics["train_threads"] == torch.get_num_threads() for t in manifest.tasks)  # to rebuild a blob


def test_appending_equals_training_at_once(tmp_path):
    once = train_model(tmp_path / "once", "m", 3, TINY).manifest("m")
    train_model(tmp_path / "twice", "m", 2, TINY)
    twice = Registry(tmp_path / "twice")
    first_two = twice.manifest("m").tasks
    from trainer import train

    train(twice, "m", 3, {}, log=lambda _: None)  # settings come from the stored model
    appended = twice.manifest("m")
    assert appended.tasks[:2] == first_two  # published tasks are untouched
    assert [t.parts for t in appended.tasks] == [t.parts for t in once.tasks]  # bit-identical blobs
    assert appended.backbones == once.backbones


def test_append_refuses_contradicting_settings(tmp_path):
    registry = train_model(tmp_path, "m", 1, TINY)
    from trainer import train

    with pytest.raises(TrainingError, match=r"--stream 'split-digits' \(model has 'permuted-digits'\)"):
        train(registry, "m", 2, {"stream": "split-digits"})
    with pytest.raises(TrainingError, match=r"--set density=0.2 \(model has 0.5\)"):
        train(registry, "m", 2, {"method_config": {"density": 0.2}})
    with pytest.raises(TrainingError, match=rf"registry {re.escape(str(tmp_path))} has no model 'mm' \(models: m\); "
                                            "to create it, give --method and --stream"):
        train(registry, "mm", 3, {})  # a mistyped --model: it said "--method is required to create a new model"
    with pytest.raises(TrainingError, match="has no model 'new' .*; to create it, give --method$"):
        train(registry, "new", 1, {"stream": "permuted-digits"})
    with pytest.raises(TrainingError, match=r"--method 'exssnet' \(model has 'supsup'\)"):
        train(registry, "m", 2, {"method": "exssnet", "method_config": {"kkt": True}})  # it said: supsup has no 'kkt'
    with pytest.raises(TrainingError, match=r"--arch \{'arch': 'mlp', 'sizes': \[64, 16, 10\]\}"):
        train(registry, "m", 2, {"architecture": {"arch": "mlp", "sizes": [64, 16, 10]}})
    cnn = {"arch": "cnn", "input_shape": [1, 8, 8], "width": 4}
    registry = train_model(tmp_path / "cnn", "m", 1, {**TINY, "architecture": cnn})
    spelled_out = {**cnn, "bn": "none", "num_classes": 10}  # its defaults: the same network, refused before
    assert len(train(registry, "m", 2, {"architecture": spelled_out}, log=lambda _: None).tasks) == 2


def test_train_refuses_fewer_than_one_task_and_writes_nothing(tmp_path):
    from registry import Registry
    from trainer import train

    registry = Registry(tmp_path / "reg")
    for tasks in (0, -2):
        with pytest.raises(TrainingError, match=f"a model needs at least 1 task, not {tasks}"):
            train(registry, "m", tasks, {"method": "supsup", "stream": "permuted-digits", **TINY})
    assert registry.find_manifest("m") is None


@pytest.mark.parametrize("argv, message", [
    (["train", "--tasks", "0", "--registry", "r", "--model", "m"], "argument --tasks: expected a positive integer, got 0"),
    (["demo", "--tasks", "-1"], "argument --tasks: expected a positive integer, got -1"),
    (["demo", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
    (["demo", "--batch-size", "x"], "argument --batch-size: expected a positive integer, got 'x'"),
    (["train", "--tasks", "2", "--registry", "r", "--model", "m", "--threads", "-1"],
     "argument --threads: expected a positive integer, got -1"),
])
def test_counts_on_the_command_line_are_checked_before_any_work(argv, message, capsys, tmp_path, monkeypatch):
    from maskbank.cli import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2 and message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no registry started


def test_demo_refuses_a_model_trained_otherwise_before_any_work(tmp_path, capsys):
    from maskbank.cli import main

    train_model(tmp_path, "m", 1, TINY, stream="split-digits")
    assert main(["demo", "--registry", str(tmp_path), "--model", "m"]) == 2
    assert capsys.readouterr().err == (
        f"maskbank demo: error: model 'm' in {tmp_path} is not a demo model (supsup on split-digits; the demo "
        "trains supsup on permuted-digits): pick another --model or --registry\n")
    assert Registry(tmp_path).generations("m") == [1]


@pytest.mark.parametrize("signal_name, status, said", [("SIGINT", 130, "interrupted"),
                                                        ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_during_training_keeps_what_was_published_and_says_so(tmp_path, signal_name, status, said):
    """SIGINT (Ctrl-C) or SIGTERM (a scheduler, `timeout`) mid-training: one line saying how many tasks
    the registry holds and how to go on, status 128 + the signal, no traceback; the published
    generations verify. (SIGTERM ended train silently.)"""
    import json
    import signal
    import subprocess
    import sys

    command = ["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "200", "--registry",
               str(tmp_path / "reg"), "--model", "m", "--arch", json.dumps(TINY["architecture"]), "--epochs", "2"]
    script = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler)\n"  # as in a terminal
              "from maskbank.cli import main; sys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", script, *command], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            if line.startswith("published task 0 "):
                process.send_signal(getattr(signal, signal_name))
                break
        rest = process.stdout.read()
        assert process.wait(60) == status
    finally:
        process.kill()
    assert "Traceback" not in rest
    published = Registry(tmp_path / "reg").manifest("m")
    assert (f"maskbank train: {said}; model 'm' has {len(published.tasks)} of 200 task(s) in {tmp_path / 'reg'} "
            f"(generation {published.generation}); the same command trains the rest") in rest
    from registry.maintenance import verify

    assert verify(Registry(tmp_path / "reg")).ok


def test_a_second_publisher_makes_train_stop_with_what_to_do(tmp_path):
    """Another publisher commits the generation train meant to write next: train stops (status 2) with
    the registry's words and what to do on the command line; what it published stays."""
    import json
    import subprocess
    import sys

    command = ["train", "--method", "supsup", "--stream", "permuted-digits", "--tasks", "50", "--registry",
               str(tmp_path / "reg"), "--model", "m", "--arch", json.dumps(TINY["architecture"]), "--epochs", "20"]
    process = subprocess.Popen([sys.executable, "-m", "maskbank", *command], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        for line in process.stdout:
            if line.startswith("published task 0 "):  # it now trains task 1, for generation 2
                registry = Registry(tmp_path / "reg")
                registry.commit(registry.manifest("m").next())  # generation 2, by someone else
                break
        rest = process.stdout.read()
        assert process.wait(60) == 2
    finally:
        process.kill()
    assert ("error: another publisher (a second `maskbank train`?) published generation 2 of model 'm' while this "
            "run trained the task it would have been, which is not published: run this command again once the other "
            "has finished") in rest
    assert Registry(tmp_path / "reg").generations("m") == [1, 2]


def test_supsup_keeps_batchnorm_statistics_per_task_and_serves_them(tmp_path):
    import numpy as np

    from registry import effective_parameters, forward
    from serving import ModelRepository, infer

    arch = {"arch": "cnn", "input_shape": [1, 8, 8], "num_classes": 10, "width": 4, "bn": "nonaffine"}
    registry = train_model(tmp_path, "bn", 2, {"architecture": arch, "method_config": {"epochs": 2}})
    manifest = registry.manifest("bn")
    stats = [registry.load(t.parts["bn_stats"]) for t in manifest.tasks]
    module = build_architecture(arch)
    layers = {n.rsplit(".", 1)[0] for n, _ in module.named_buffers() if n.endswith("running_mean")}
    assert layers and {k.rsplit(".", 1)[0] for k in stats[0]} == layers
    assert any(not torch.equal(stats[0][k], stats[1][k]) for k in stats[0])  # each task has its own

    repository = ModelRepository(registry)
    repository.refresh()
    x = get_stream("permuted-digits").task(1).x_test[:16]
    backbone = registry.load_backbone(manifest, "1")
    parts = {k: registry.load(r) for k, r in manifest.task(1).parts.items()}
    expected = forward(module, effective_parameters("supsup", backbone, parts), x)
    assert np.array_equal(infer(repository.get("bn"), x.numpy(), task=1).logits, expected.detach().numpy())
    with pytest.raises(RuntimeError, match="running_mean"):  # statistics are never silently defaulted
        forward(module, effective_parameters("supsup", backbone, {"masks": parts["masks"]}), x)


def test_appending_with_other_settings_names_the_flags_to_omit(tmp_path):
    """The refusal names each clashing option by its command-line flag (it said --architecture for --arch)."""
    from trainer import train

    registry = train_model(tmp_path, "m", 1, TINY)
    other = {"method": "supsup", "stream": "permuted-digits", "architecture": {"arch": "mlp", "sizes": [64, 16, 10]},
             "method_config": {"epochs": 3}}
    with pytest.raises(TrainingError) as info:
        train(registry, "m", 2, other)
    message = str(info.value)
    assert "--arch {'arch': 'mlp', 'sizes': [64, 16, 10]} (model has {'arch': 'mlp', 'sizes': [64, 32, 10]})" in message
    assert "--set epochs=3 (model has 2)" in message and registry.generations("m") == [1]
    with pytest.raises(MaskbankError) as info:  # a spec that cannot be built: said so, not as a clash
        train(registry, "m", 2, {"architecture": {"arch": "mlp"}})
    assert "architecture 'mlp': missing a required argument: 'sizes'" in str(info.value)
    assert "other settings" not in str(info.value) and registry.generations("m") == [1]
    huge = {"arch": "mlp", "sizes": [64, 1_000_000, 1_000_000, 10]}  # 4 TB of weights: the clash, not a memory error
    with pytest.raises(TrainingError, match=r"--arch \{'arch': 'mlp', 'sizes': \[64, 1000000, 1000000, 10\]\} \(model has"):
        train(registry, "m", 2, {"architecture": huge})


def test_fwt_says_how_many_tasks_it_covers(tmp_path):
    """--fwt given on an append only: FWT averaged over the tasks with a trained-alone reference was
    printed as the model's FWT with no word that it left the others out."""
    from maskbank.cli import format_report
    from trainer import train

    settings = {"method": "supsup", "stream": "permuted-digits", **TINY}
    registry = Registry(tmp_path)
    train(registry, "m", 2, settings, log=lambda _: None)
    partial = train(registry, "m", 3, {}, log=lambda _: None, fwt=True)
    assert partial.training["fwt_tasks"] == 1 and partial.training["fwt"] is not None
    assert "(over 1 of the 2 tasks after the first: the others were trained without --fwt)" in format_report(partial)
    whole = train(Registry(tmp_path / "whole"), "m", 3, settings, log=lambda _: None, fwt=True)
    assert whole.training["fwt_tasks"] == 2 and "over" not in format_report(whole).split("FWT")[1].split("\n")[0]
    first = train(Registry(tmp_path / "first"), "m", 1, settings, log=lambda _: None, fwt=True)
    first = train(Registry(tmp_path / "first"), "m", 2, {}, log=lambda _: None)  # it told them to do what they did
    assert "FWT (only the first task was trained with --fwt; FWT needs a later one)" in format_report(first)
    assert "FWT (train with --fwt)" in format_report(registry.manifest("m", 1))


def test_the_text_report_shows_metrics_that_are_not_numbers(tmp_path):
    """Connectivity scores, KKT sources and ImpressLearn's alpha norms (lists, texts) appeared only in
    --json, though the README lists them among what `report` prints."""
    import dataclasses

    from maskbank.cli import format_report

    from .conftest import manifest_with

    manifest = manifest_with(Registry(tmp_path))
    entry = dataclasses.replace(manifest.tasks[0], metrics={"accuracy": 0.9, "train_seconds": 1.5, "share": "lowest",
                                                            "scores": {"0": {"connectivity": 0.13104}}, "chosen": [0]})
    training = {"settings": {"method": "packnet-share", "stream": "permuted-digits", "seed": 0},
                "accuracy_matrix": [[0.9]], "average_accuracy": 0.9, "forgetting": 0.0, "bwt": 0.0, "fwt": None}
    text = format_report(dataclasses.replace(manifest, tasks=(entry,), training=training))
    assert "| task | train_seconds |" in text
    assert text.endswith("other metrics:\n- 0 (t0): chosen: [0]; scores: {0: {connectivity: 0.131}}; share: lowest")


@pytest.mark.parametrize("command, message", [
    (["--method", "impresslearn", "--basis", "random", "--basis-size", "2", "--set", "alpha_epochs=1",
      "--set", "alpha_lr=1e30"],
     "task 0 (perm-0) alpha: the training loss became nan (diverged); lower --set alpha_lr (or --set penalty)"),
    (["--method", "supsup", "--epochs", "1", "--lr", "1e30"],
     "task 0 (perm-0): the trained values are no longer finite numbers (diverged); lower the learning rate (--lr)"),
    (["--method", "exssnet", "--epochs", "1", "--set", "weight_epochs=2", "--set", "weight_lr=1e30"],  # it said --lr
     "task 0 (perm-0) weights: the training loss became nan (diverged); lower the weight phase's --set weight_lr"),
    (["--method", "packnet-share", "--share", "lowest", "--epochs", "1"],
     "share 'lowest' ranks subnetworks by connectivity, which needs at least two hidden layers"),
])
def test_a_first_task_that_fails_leaves_nothing_behind(command, message, capsys, tmp_path, monkeypatch):
    """ImpressLearn's own alpha loop had no divergence check: NaN alpha was published (exit 0), served as
    garbage, and written into the manifest as bare NaN, which no strict JSON reader takes. SupSup's loss
    stays finite on NaN scores (a mask is their top-k), so it published masks of nothing learned. And
    the backbone was written before the first task, so any first-task failure left an orphan blob."""
    from maskbank.cli import main

    monkeypatch.chdir(tmp_path)
    code = main(["train", *command, "--stream", "permuted-digits", "--tasks", "1", "--registry", "reg", "--model", "m",
                 "--arch", '{"arch": "mlp", "sizes": [64, 32, 10]}'])
    assert code == 2 and message in capsys.readouterr().err
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_an_artifact_with_values_that_are_not_finite_is_never_published():
    """The last guard, for a method's loop that checks nothing as it goes (a plugin's, say)."""
    from trainer.fit import TrainingDiverged
    from trainer.loop import _check_publishable
    from trainer.methods import TaskArtifact

    fine = {"head": {"w": torch.ones(2)}}
    _check_publishable("task 0", TaskArtifact(parts=fine, metrics={"alpha_l1": [1.0, 2.0]}))
    with pytest.raises(TrainingDiverged, match=r"task 0: its part 'alpha' holds values that are not finite numbers \(l0\)"):
        _check_publishable("task 0", TaskArtifact(parts={"alpha": {"l0": torch.tensor([float("nan")])}}))
    with pytest.raises(TrainingDiverged, match=r"task 0: its metrics \['alpha_l1'\] are not finite numbers"):
        _check_publishable("task 0", TaskArtifact(parts=fine, metrics={"alpha_l1": [float("nan")], "rule": "x"}))



def test_train_help_shows_each_methods_defaults(capsys):
    """--epochs, --lr, --density ... differ by method, so their flags showed no default at all."""
    from maskbank.cli import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "defaults of each method's options (the flags above, or --set KEY=VALUE for any):" in out
    assert "  supsup: density=0.5 mask=topk epochs=30 lr=0.3 batch_size=64" in out
    assert "  exssnet: density=0.1 epochs=30" in out


def test_each_epoch_is_logged_at_debug_for_runs_without_a_terminal(tmp_path, caplog):
    """The progress bar shows on a terminal only: a run writing to a log file (a cl-lsg task of 30 s) said
    nothing until the task ended, also at --log-level DEBUG."""
    import logging

    with caplog.at_level(logging.DEBUG, logger="maskbank.trainer"):
        train_model(tmp_path, "m", 1, TINY)
    epochs = [r.getMessage() for r in caplog.records if r.name == "maskbank.trainer"]
    assert len(epochs) == TINY["method_config"]["epochs"] and epochs[-1].startswith("task 0 (perm-0)")
    assert re.search(rf"epoch {TINY['method_config']['epochs']} of {TINY['method_config']['epochs']}, loss \d", epochs[-1])
