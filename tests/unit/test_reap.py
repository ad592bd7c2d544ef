"""An agent that starts kills what its dead predecessor left running, and nothing else."""

from __future__ import annotations

import subprocess
import time

from batchd.scheduler.runtimes import process_mark, reap_leftovers


def _group() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"], start_new_session=True)


def _gone(process: subprocess.Popen, seconds: float = 5) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return True
        time.sleep(0.01)
    return False


def test_a_left_task_group_is_killed_and_its_slot_freed(tmp_path):
    left = _group()
    slot = tmp_path / "slot-1.pid"
    slot.write_text(process_mark(left.pid))
    (tmp_path / "slot-2.pid").write_text("")  # a free slot
    assert reap_leftovers(tmp_path) == 1
    assert _gone(left)
    assert slot.read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slot-1.pid", "slot-2.pid"]


def test_a_mark_from_another_boot_or_a_reused_id_kills_nothing(tmp_path):
    bystander = _group()
    try:
        pid, boot, started = process_mark(bystander.pid).split()
        (tmp_path / "old-boot.pid").write_text(f"{pid} 00000000-0000-0000-0000-000000000000 "
                                                f"{started}")  # fmt: skip
        (tmp_path / "reused.pid").write_text(f"{pid} {boot} {int(started) - 1}")
        (tmp_path / "garbage.pid").write_text("not a mark")
        assert reap_leftovers(tmp_path) == 0
        assert bystander.poll() is None  # still running
        assert all(p.read_text() == "" for p in tmp_path.iterdir())
    finally:
        bystander.kill()
        bystander.wait()
