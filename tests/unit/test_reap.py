"""An agent that starts kills what its dead predecessor left running, and nothing else."""

from __future__ import annotations

import os
import subprocess
import time

from batchd.scheduler.runtimes import TASK_VARIABLE, process_mark, reap_leftovers
from tests.processes import alive

LABEL = "job-1.1.0"


def _group(label: str | None = LABEL) -> subprocess.Popen:
    """A process group like a task's: a shell leader that waits on its stdin, and a child."""
    env = {k: v for k, v in os.environ.items() if k != TASK_VARIABLE}
    if label:
        env[TASK_VARIABLE] = label
    return subprocess.Popen(["sh", "-c", "sleep 60 & echo $!; read _"], env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            start_new_session=True, text=True)  # fmt: skip


def _until_gone(pid: int, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.01)
    return False


def _until_labelled(pid: int, seconds: float = 5) -> bool:
    """Wait until process `pid` carries the task's label (a child just started may not have
    exec'd yet: until then its environment is its parent's)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            if f"{TASK_VARIABLE}={LABEL}".encode() in handle.read().split(b"\0"):
                return True
        time.sleep(0.01)
    return False


def _leaderless(group: subprocess.Popen) -> int:
    """End the group's leader, leaving its child; the child's pid."""
    child = int(group.stdout.readline())
    group.stdin.close()
    group.wait()
    return child


def test_a_left_task_group_is_killed_and_its_slot_freed(tmp_path):
    with _group() as left:
        child = int(left.stdout.readline())
        slot = tmp_path / "slot-1.pid"
        slot.write_text(process_mark(left.pid, LABEL))
        (tmp_path / "slot-2.pid").write_text("")  # a free slot
        assert reap_leftovers(tmp_path) == 1
        assert _until_gone(child)
    assert slot.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot-1.pid", "slot-2.pid"]


def test_of_a_group_whose_leader_is_gone_only_the_tasks_processes_are_killed(tmp_path):
    with _group() as ours, _group(label=None) as stranger:
        ours_mark = process_mark(ours.pid, LABEL)
        stranger_mark = process_mark(stranger.pid, LABEL)  # as if its id were a task's
        ours_child, stranger_child = _leaderless(ours), _leaderless(stranger)
    try:
        (tmp_path / "a.pid").write_text(ours_mark)
        (tmp_path / "b.pid").write_text(stranger_mark)
        assert reap_leftovers(tmp_path) == 1
        assert _until_gone(ours_child)
        assert alive(stranger_child)  # no label: not the task's, whatever its group id
    finally:
        os.kill(stranger_child, 9)


def test_a_mark_from_another_boot_or_a_reused_id_kills_nothing(tmp_path):
    # the bystander runs another task (another agent's, on this machine) in a group whose id
    # the marks name: only the label tells a task's processes
    with _group(label="job-9.1.0") as bystander:
        child = int(bystander.stdout.readline())
        _check_nothing_is_killed(tmp_path, bystander, child)


def _check_nothing_is_killed(tmp_path, bystander: subprocess.Popen, child: int) -> None:
    try:
        pid, boot, started, label = process_mark(bystander.pid, LABEL).split()
        nil = "00000000-0000-0000-0000-000000000000"
        (tmp_path / "old-boot.pid").write_text(f"{pid} {nil} {started} {label}")
        (tmp_path / "reused.pid").write_text(f"{pid} {boot} {int(started) - 1} {label}")
        (tmp_path / "older-format.pid").write_text(pid)
        (tmp_path / "garbage.pid").write_text("not a mark")
        assert reap_leftovers(tmp_path) == 0
        assert alive(bystander.pid) and alive(child)
        assert all(p.read_text() == "" for p in tmp_path.iterdir())
    finally:
        os.killpg(bystander.pid, 9)
        bystander.wait()


def test_what_left_the_tasks_group_is_killed_too_by_its_label(tmp_path):
    with _group() as left, _group(label="job-9.1.0") as other:
        left_child, other_child = (int(p.stdout.readline()) for p in (left, other))
        detached = subprocess.Popen(
            ["sleep", "60"], start_new_session=True, env={**os.environ, TASK_VARIABLE: LABEL}
        )  # setsid
        try:
            assert _until_labelled(detached.pid)  # exec'd: its environment is the label's
            (tmp_path / "slot-1.pid").write_text(process_mark(left.pid, LABEL))
            assert reap_leftovers(tmp_path) == 1
            assert _until_gone(left_child) and detached.wait(5) == -9
            assert alive(other_child)
        finally:
            detached.kill()
            os.killpg(other.pid, 9)


def test_an_earlier_versions_slot_kills_only_processes_of_its_task(tmp_path, monkeypatch):
    # earlier versions wrote the bare group id into <jobId>-<attempt>-<task>.pid
    monkeypatch.setenv("AZ_BATCHAI_JOB_ID", "0b7c-job")
    monkeypatch.setenv("AZ_BATCHAI_JOB_ATTEMPT", "2")
    monkeypatch.setenv("AZ_BATCHAI_TASK_INDEX", "0")
    with _group() as task, _group() as other:
        task_child, other_child = (int(p.stdout.readline()) for p in (task, other))
        (tmp_path / "0b7c-job-2-0.pid").write_text(str(task.pid))
        (tmp_path / "0b7c-job-3-0.pid").write_text(str(other.pid))  # another attempt's
        try:
            assert reap_leftovers(tmp_path) == 1
            assert _until_gone(task_child) and alive(other_child)
        finally:
            os.killpg(other.pid, 9)
