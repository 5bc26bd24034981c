"""Reading the kernel's OOM-kill count of a process's memory cgroup (v1 and v2 layouts, in and out of a container),
and telling a SIGKILL from other deaths of a pool process."""

from __future__ import annotations

from pathlib import Path

import pytest
from billiard.exceptions import WorkerLostError

from worker.oom import MemoryCgroup, died_of_sigkill


def fake_proc(tmp_path: Path, cgroup: str, mount: str) -> Path:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(cgroup)
    (proc / "mountinfo").write_text(f"22 1 0:21 / /proc rw,nosuid - proc proc rw\n{mount}\n")
    return proc


def test_cgroup_v1_is_found_below_the_memory_mount(tmp_path: Path):
    folder = tmp_path / "memory" / "workers" / "w1"
    folder.mkdir(parents=True)
    (folder / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    (folder / "memory.limit_in_bytes").write_text(str(512 * 2**20))
    memberships = "5:cpu:/\n4:memory:/workers/w1\n1:name=systemd:/\n0::/\n"
    proc = fake_proc(tmp_path, memberships, f"35 31 0:32 / {tmp_path / 'memory'} rw - cgroup cgroup rw,memory")
    cgroup = MemoryCgroup.of(proc)
    assert cgroup == MemoryCgroup(folder, 1)
    assert (cgroup.oom_kills(), cgroup.limit_bytes()) == (3, 512 * 2**20)


@pytest.mark.parametrize("path", ["/", "/docker/0123abc"])
def test_cgroup_v2_in_a_container_is_the_mount_itself(tmp_path: Path, path: str):
    # With a cgroup namespace the path is "/"; without one it names the host's folder, mounted as the root.
    mount = tmp_path / "cgroup"
    mount.mkdir()
    (mount / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\noom_group_kill 0\n")
    (mount / "memory.max").write_text("max\n")
    proc = fake_proc(tmp_path, f"0::{path}\n", f"30 25 0:26 {path} {mount} rw - cgroup2 cgroup2 rw")
    cgroup = MemoryCgroup.of(proc)
    assert cgroup == MemoryCgroup(mount, 2)
    assert (cgroup.oom_kills(), cgroup.limit_bytes()) == (1, None)


def test_no_memory_controller_means_no_count(tmp_path: Path):
    proc = fake_proc(tmp_path, "5:cpu:/\n", f"32 31 0:29 / {tmp_path} rw - cgroup cgroup rw,cpu")
    assert MemoryCgroup.of(proc) is None
    assert MemoryCgroup.of(tmp_path / "absent") is None


def test_only_a_sigkill_can_be_the_oom_killer():
    assert died_of_sigkill(WorkerLostError("Worker exited prematurely: signal 9 (SIGKILL) Job: 0."))
    assert not died_of_sigkill(WorkerLostError("Worker exited prematurely: signal 15 (SIGTERM) Job: 0."))
    assert not died_of_sigkill(WorkerLostError("Worker exited prematurely: exitcode 1 Job: 0."))
    assert not died_of_sigkill(RuntimeError("signal 9 (SIGKILL)"))
