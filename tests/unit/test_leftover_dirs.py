"""An agent that starts removes the directories of tasks its predecessor did not see to their
end (it was killed, or stopped while they ran), and nothing else."""

from __future__ import annotations

import os
from pathlib import Path

from batchd.scheduler.runtimes import (
    forget_dirs,
    hold_job_temp,
    record_dirs,
    release_job_temp,
    sweep_dirs,
)


def _spec(root: Path, task: int, world: str | None = None) -> dict:
    env = {"AZ_BATCHAI_JOB_TEMP": str(root / "temp" / "job.1")}
    if world:
        env["WORLD_SIZE"] = world
    return {"env": env, "workDir": str(root / "work" / f"job.1.{task}")}


def _make(spec: dict) -> None:
    for path in (spec["workDir"], spec["env"]["AZ_BATCHAI_JOB_TEMP"]):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "checkpoint.bin").write_bytes(b"\0" * 1024)


def _recorded(tmp_path: Path, spec: dict) -> Path:
    """The agent's slots directory, with a task's directories recorded in slot 1 and made."""
    running = tmp_path / "running"
    running.mkdir()
    record_dirs(running / "slot-1.dirs", spec)
    _make(spec)
    return running


def test_a_one_node_tasks_work_and_temp_directories_are_removed(tmp_path):
    running = _recorded(tmp_path, _spec(tmp_path, 0))
    (running / "slot-2.dirs").write_text("")  # a free slot
    kept = tmp_path / "work" / "job.2.0"  # another task's, not recorded here
    kept.mkdir(parents=True)

    assert sweep_dirs(running) == 1
    assert list((tmp_path / "temp").iterdir()) == []
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["job.2.0"]
    assert (running / "slot-1.dirs").read_text() == ""  # swept once: a second sweep finds none
    assert sweep_dirs(running) == 0


def test_a_task_seen_to_its_end_leaves_nothing_to_sweep(tmp_path):
    running = _recorded(tmp_path, _spec(tmp_path, 0))
    forget_dirs(running / "slot-1.dirs")  # its end removed them (or handed them on)
    assert sweep_dirs(running) == 0
    assert (tmp_path / "work" / "job.1.0").is_dir()


def test_a_shared_job_temp_is_removed_only_when_no_task_of_the_job_holds_it(tmp_path):
    running = tmp_path / "running"
    running.mkdir()
    mine, other = _spec(tmp_path, 0, world="2"), _spec(tmp_path, 1, world="2")
    temp = Path(mine["env"]["AZ_BATCHAI_JOB_TEMP"])
    record_dirs(running / "slot-1.dirs", mine)
    os.close(hold_job_temp(mine))  # the dead agent's hold went with its process
    held = hold_job_temp(other)  # the job's other task, of another agent on this machine
    _make(mine)

    assert sweep_dirs(running) == 1
    assert not (tmp_path / "work" / "job.1.0").exists()  # the task's own directory
    assert temp.is_dir()  # still the other task's
    release_job_temp(other, held)  # which, the last holder now, removes it
    assert list((tmp_path / "temp").iterdir()) == []

    record_dirs(running / "slot-1.dirs", mine)  # again, and no task of the job is left
    os.close(hold_job_temp(mine))
    _make(mine)
    assert sweep_dirs(running) == 1
    assert list((tmp_path / "temp").iterdir()) == []  # the directory and its lock file


def test_a_damaged_record_is_cleared_and_removes_nothing(tmp_path):
    running = tmp_path / "running"
    running.mkdir()
    (running / "slot-1.dirs").write_text('{"own": [')
    (running / "slot-2.dirs").write_text('["/"]')
    assert sweep_dirs(running) == 0
    assert [p.read_text() for p in sorted(running.iterdir())] == ["", ""]
    assert sweep_dirs(tmp_path / "absent") == 0
