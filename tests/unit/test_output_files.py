"""Output files are opened part by part, never through a link, and served from what was
opened: a job that turns its output into a link between the reader's look at the path and
its open gets nothing the link leads to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchd.scheduler import agent, files
from batchd.scheduler.schema import DocumentError


@pytest.fixture
def swapped(tmp_path: Path, monkeypatch):
    """A job's stdout.txt, and the secret it becomes a link to just after the reader first
    looks at its path (the old check, `files.unlinked`, or the open of its directory)."""
    secret = tmp_path / "admin.token"
    secret.write_text("the admin token\n")
    out = tmp_path / "mounts/logs/out"
    out.mkdir(parents=True)
    (out / "stdout.txt").write_text("plain\n")

    def swap() -> None:
        (out / "stdout.txt").unlink()
        (out / "stdout.txt").symlink_to(secret)

    unlinked = getattr(files, "unlinked", None)
    if unlinked is not None:  # (the reader before the fix: a check, then an open)
        monkeypatch.setattr(files, "unlinked", lambda path: (unlinked(path), swap())[0])
    real_open = os.open

    def open_then_swap(path, flags, *args, dir_fd=None, **options):
        if path == "stdout.txt" and not (out / "stdout.txt").is_symlink():
            swap()
        return real_open(path, flags, *args, dir_fd=dir_fd, **options)

    monkeypatch.setattr(os, "open", open_then_swap)
    return out


def test_the_agent_never_serves_a_link_swapped_in_after_its_look(swapped: Path):
    answer = agent.read_output({"path": str(swapped / "stdout.txt"), "offset": 0, "size": 100})
    assert "data" not in answer and answer["error"]["code"] == "refused"


def test_the_daemon_never_serves_a_link_swapped_in_after_its_look(swapped: Path):
    mount_root = swapped.parent.parent.parent
    with pytest.raises(DocumentError) as refused:
        files.open_inside(swapped, "stdout.txt", "path", mount_root)
    assert refused.value.problems == [("path", files.LINKED)]


def test_a_link_anywhere_on_the_way_is_refused_and_a_plain_path_opens(tmp_path: Path):
    (tmp_path / "a/b").mkdir(parents=True)
    (tmp_path / "a/b/file").write_text("data")
    (tmp_path / "to-b").symlink_to(tmp_path / "a/b")
    (tmp_path / "a/b/dangling").symlink_to(tmp_path / "nothing")
    fd = files.open_beneath(tmp_path, ["a", "b", "file"])
    try:
        assert os.pread(fd, 10, 0) == b"data"
    finally:
        os.close(fd)
    for parts in (["to-b", "file"], ["to-b"], ["a", "b", "dangling"], ["a", "..", "a"]):
        with pytest.raises(files.Linked):
            os.close(files.open_beneath(tmp_path, parts))
    with pytest.raises(FileNotFoundError):
        files.open_beneath(tmp_path, ["a", "absent"])
    with pytest.raises(NotADirectoryError):
        files.open_beneath(tmp_path, ["a", "b", "file", "below"])


def test_a_listing_leaves_links_and_fifos_out_and_follows_none(tmp_path: Path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out/stdout.txt").write_text("hello\n")
    (tmp_path / "out/sub").mkdir()
    (tmp_path / "out/dangling").symlink_to(tmp_path / "nothing")
    (tmp_path / "out/elsewhere").symlink_to(tmp_path)
    os.mkfifo(tmp_path / "out/pipe")  # neither a file nor a directory: nothing to download
    entries = files.listing(tmp_path / "out")
    assert [(e["name"], e["isDirectory"], e["contentLength"]) for e in entries] == [
        ("stdout.txt", False, 6), ("sub", True, 0)]  # fmt: skip


def test_the_agent_reads_no_fifo_or_device_a_job_made_in_its_output(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    os.mkfifo(out / "pipe")  # (a root container could mknod a disk's device node the same way)
    for path in (out / "pipe", Path("/dev/zero")):
        answer = agent.read_output({"path": str(path), "offset": 0, "size": 100})
        assert "data" not in answer and "not a regular file" in answer["error"]["message"]


def test_each_tasks_own_stdouterr_files_name_their_task():
    from batchd.scheduler.runtimes import output_suffix

    for task in (1, 2, 17):
        for preparation in (False, True):
            suffix = output_suffix({"task": task}, preparation)
            for stream in ("stdout", "stderr"):
                assert files.task_of("stdouterr", f"{stream}{suffix}.txt") == task
                assert files.task_of("StdOutErr", f"./{stream}{suffix}.txt") == task
                assert files.task_of("outputs", f"{stream}{suffix}.txt") == 0  # not stdouterr
    for other in ("stdout.txt", "stderr-prep.txt", "stdout-0.txt", "stdout-1.log", "a/stdout-1.txt",
                  "model-1.txt", "stdout-x.txt", "."):  # fmt: skip
        assert files.task_of("stdouterr", other) == 0, other
