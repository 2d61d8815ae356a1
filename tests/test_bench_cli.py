"""`python -m bench` as a user calls it: --help names every benchmark, an unknown name is refused
with the list of known ones (nothing runs)."""

from __future__ import annotations

import subprocess
import sys

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
