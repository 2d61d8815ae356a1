"""The weight cache's default bound: a share of the memory the process may use (serving/memory.py),
read from cgroup files laid out as Linux lays them out, under a temporary root."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from serving.memory import cache_share, host_memory, resolve_cache_bytes

GIB = 1 << 30


def lay_out(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cgroup_v2_limit_below_the_machine_bounds_memory(tmp_path):
    root = lay_out(tmp_path, {"proc/self/cgroup": "0::/kubepods/pod1/c1\n",
                              "sys/fs/cgroup/memory.max": "max\n",
                              "sys/fs/cgroup/kubepods/pod1/c1/memory.max": f"{2 * GIB}\n"})
    assert host_memory(root, physical=16 * GIB) == (2 * GIB, "the container's memory limit (cgroup)")


def test_a_container_sees_its_own_cgroup_at_the_mount_root(tmp_path):
    # Without a cgroup namespace, /proc/self/cgroup names the host's path, which the container's mount lacks.
    root = lay_out(tmp_path, {"proc/self/cgroup": "12:freezer:/\n4:memory:/docker/abc\n0::/\n",
                              "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{3 * GIB}\n"})
    assert host_memory(root, physical=16 * GIB).bytes == 3 * GIB


def test_the_lowest_limit_wins_and_unlimited_ones_are_ignored(tmp_path):
    root = lay_out(tmp_path, {"proc/self/cgroup": "4:cpu,memory:/a\n\nnot a cgroup line\n0::/b\n",
                              "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n",  # v1's "none"
                              "sys/fs/cgroup/memory/a/memory.limit_in_bytes": f"{5 * GIB}\n",
                              "sys/fs/cgroup/b/memory.max": f"{4 * GIB}\n"})
    assert host_memory(root, physical=16 * GIB).bytes == 4 * GIB


def test_without_a_limit_it_is_the_machines_memory(tmp_path):
    assert host_memory(tmp_path, physical=8 * GIB) == (8 * GIB, "the machine's memory")  # no /proc/self/cgroup
    root = lay_out(tmp_path, {"proc/self/cgroup": "0::/x\n", "sys/fs/cgroup/x/memory.max": "max\n"})
    assert host_memory(root, physical=8 * GIB) == (8 * GIB, "the machine's memory")
    assert 0 < host_memory().bytes  # this machine's, whatever it is


def test_a_share_is_resolved_on_the_device_and_bytes_are_kept():
    memory = host_memory()
    assert resolve_cache_bytes(256 << 20, torch.device("cpu")).describe() == "256.0 MiB"
    bound = resolve_cache_bytes("25%", torch.device("cpu"))
    assert bound.bytes == memory.bytes // 4 and bound.memory == memory
    assert "(25% of " in bound.describe() and bound.describe().endswith(f", {memory.source})")
    assert resolve_cache_bytes("100%", torch.device("cpu")).bytes == memory.bytes
    assert [cache_share(s) for s in ("25%", " 12.5 % ", "100%")] == [0.25, 0.125, 1.0]
    for text in ("0%", "101%", "%", "x%", "25", "٢٥%"):
        with pytest.raises(ValueError, match=f"--cache-bytes '{text}' is not a share of memory above 0%"):
            cache_share(text)
    with pytest.raises(ValueError, match=r"--cache-bytes 0.000001% comes to \d+ bytes of .*: too few"):
        resolve_cache_bytes("0.000001%", torch.device("cpu"))


def test_limits_of_ancestor_cgroups_and_joint_v1_mounts_count(tmp_path):
    """A systemd slice's MemoryMax bounds the services under it; a v1 memory controller mounted with
    another is found under their joint name; binary junk in a file is no limit, not a crash."""
    v2 = lay_out(tmp_path / "v2", {"proc/self/cgroup": "0::/slice/service\n",
                                   "sys/fs/cgroup/slice/memory.max": f"{2 * GIB}\n",
                                   "sys/fs/cgroup/slice/service/memory.max": "max\n"})
    assert host_memory(v2, physical=16 * GIB).bytes == 2 * GIB
    joint = lay_out(tmp_path / "v1", {"proc/self/cgroup": "3:cpuset,memory:/job\n",
                                      "sys/fs/cgroup/cpuset,memory/job/memory.limit_in_bytes": f"{GIB}\n"})
    assert host_memory(joint, physical=16 * GIB).bytes == GIB
    junk = lay_out(tmp_path / "junk", {"sys/fs/cgroup/x/memory.max": "max"})
    (junk / "proc/self").mkdir(parents=True)
    (junk / "proc/self/cgroup").write_bytes(b"0::/x\n\xff\xfe:\x00\n")
    (junk / "sys/fs/cgroup/memory.max").write_bytes(b"\xff\xfe12")
    assert host_memory(junk, physical=16 * GIB) == (16 * GIB, "the machine's memory")


def test_the_library_repository_checks_its_cache_setting_as_the_server_does(tmp_path):
    from registry import Registry
    from serving import ModelRepository

    registry = Registry(tmp_path)
    for setting, message in ((True, "got True"), (2e8, "got 200000000.0"), ("256MiB", "give a size as a number of bytes"),
                             (100, "100 is 100 bytes, too few"), (-1, "must be at least 0")):
        with pytest.raises(ValueError, match=message):
            ModelRepository(registry, cache_bytes=setting)
    assert ModelRepository(registry, cache_bytes=0).cache.capacity_bytes == 0
    assert ModelRepository(registry).cache.capacity_bytes == host_memory().bytes // 4
