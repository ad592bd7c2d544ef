"""A multi-node job's tasks on one machine share its job-temp directory; the last to end
removes it, and a task starting while it is being removed gets a fresh one."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

from batchd.scheduler.runtimes import hold_job_temp, release_job_temp, shares_job_temp


def _spec(temp: Path, world: str | None = "2") -> dict:
    env = {"AZ_BATCHAI_JOB_TEMP": str(temp)}
    if world:
        env["WORLD_SIZE"] = world
    return {"env": env}


def test_only_a_multi_node_task_shares_its_job_temp(tmp_path):
    assert shares_job_temp(_spec(tmp_path / "j.1"))
    assert not shares_job_temp(_spec(tmp_path / "j.1", world=None))


def test_the_job_temp_stays_until_the_last_task_here_ends(tmp_path):
    temp = tmp_path / "temp" / "job.1"
    spec = _spec(temp)
    first, second = hold_job_temp(spec), hold_job_temp(spec)
    temp.mkdir()
    (temp / "mpi-hostfile").write_text("10.0.0.4 slots=1\n")
    release_job_temp(spec, first)
    assert (temp / "mpi-hostfile").read_text() == "10.0.0.4 slots=1\n"  # the other still runs
    release_job_temp(spec, second)
    assert list((tmp_path / "temp").iterdir()) == []  # the directory and its lock file
    third = hold_job_temp(spec)  # a later task of the job starts afresh
    assert third is not None
    release_job_temp(spec, third)
    assert list((tmp_path / "temp").iterdir()) == []


def test_a_task_starting_while_the_last_one_removes_it_gets_a_new_directory(tmp_path):
    temp = tmp_path / "job.1"
    spec = _spec(temp)
    lock = Path(f"{temp}.lock")
    remover = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(remover, fcntl.LOCK_EX)  # the last holder, removing the directory
    got: list[int | None] = []
    starting = threading.Thread(target=lambda: got.append(hold_job_temp(spec)))
    starting.start()
    starting.join(0.2)
    assert starting.is_alive()  # waits for the removal to finish
    lock.unlink()
    os.close(remover)
    starting.join(5)
    fd = got[0]
    assert fd is not None and os.path.samestat(os.fstat(fd), os.stat(lock))  # the new lock
    other = hold_job_temp(spec)  # a second task of the job shares it
    release_job_temp(spec, fd)
    assert lock.exists()
    release_job_temp(spec, other)
    assert not lock.exists()
