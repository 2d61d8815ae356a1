"""`python -m bench` as a user calls it: --help names every benchmark, an unknown name is refused
with the list of known ones (nothing runs)."""

from __future__ import annotations

import runpy
import subprocess
import sys

import pytest

from bench.__main__ import available


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_benchmark_with_its_summary():
    result = bench("--help")
    assert result.returncode == 0, result.stderr
    assert "## " not in result.stdout  # nothing ran
    for name in available():
        assert any(line.split()[:1] == [name] and len(line.split()) > 2 for line in result.stdout.splitlines()), name
    assert "snapshot_memory  Snapshot memory benchmark" in result.stdout


def test_an_unknown_benchmark_is_refused_with_the_known_names():
    result = bench("gn", "nope")
    assert result.returncode == 1
    assert "unknown benchmark(s): nope (known: accuracy," in result.stderr
    assert "## gn" not in result.stdout


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # available() imported them
@pytest.mark.parametrize("name", available())
def test_each_benchmark_module_answers_help_and_refuses_arguments_without_running(name, monkeypatch, capsys):
    """`python -m bench.storage --help` ran the whole benchmark (minutes), and `python -m bench.gn`
    ran nothing at all. Every module now runs as __main__ the way the command line does."""
    for argv, status in (([f"bench.{name}", "--help"], 0), ([f"bench.{name}", "--no-such-option"], 2)):
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as stopped:
            runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
        assert stopped.value.code == status, name
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: python -m bench.{name} ") and "## " not in out
    assert f"python -m bench.{name}: error: unrecognized arguments: --no-such-option" in err
