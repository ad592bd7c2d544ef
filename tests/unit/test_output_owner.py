"""An attempt's stdouterr directory belongs to one job: a name reused after its job was
deleted leads to the same path, and the new job's tasks set the old output aside."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from batchd.scheduler import files


def test_a_new_job_sets_a_deleted_jobs_output_aside_and_keeps_it(tmp_path: Path):
    out = tmp_path / "again/1/stdouterr"
    files.claim(out, "old")
    (out / "stdout.txt").write_text("old output\n")
    files.claim(out, "old")  # the same job again (a StartTask sent twice): nothing moves
    assert (out / "stdout.txt").exists() and files.owner(out) == "old"
    files.claim(out, "new")
    assert files.owner(out) == "new" and not (out / "stdout.txt").exists()
    assert (tmp_path / "again/1/stdouterr-old/stdout.txt").read_text() == "old output\n"
    assert [e["name"] for e in files.listing(out)] == []  # the marker is not the job's output


def test_the_tasks_of_one_job_claiming_a_shared_directory_at_once_all_keep_it(tmp_path: Path):
    for round_ in range(20):
        out = tmp_path / f"r{round_}/stdouterr"
        files.claim(out, "old")
        (out / "stdout.txt").write_text("old\n")
        go = threading.Barrier(4)

        def task(index: int, out: Path = out, go: threading.Barrier = go) -> None:
            go.wait()
            files.claim(out, "new")
            with open(out / "stdout.txt", "a") as handle:
                handle.write(f"task {index}\n")

        threads = [threading.Thread(target=task, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert files.owner(out) == "new"
        assert sorted((out / "stdout.txt").read_text().splitlines()) == [
            f"task {i}" for i in range(4)
        ]
        assert (out.with_name("stdouterr-old") / "stdout.txt").read_text() == "old\n"


def test_the_output_of_a_names_first_job_has_no_marker_and_is_set_aside_by_the_next(tmp_path):
    out = tmp_path / "stdouterr"
    out.mkdir()  # a name's first job makes its directories plainly
    (out / "stdout.txt").write_text("first\n")
    assert files.owner(out) is None
    files.claim(out, "second")
    assert files.owner(out) == "second" and not (out / "stdout.txt").exists()
    kept = tmp_path / f"stdouterr-{files.FOREIGN}/stdout.txt"
    assert kept.read_text() == "first\n"


def test_a_marker_a_job_replaced_with_a_fifo_or_a_link_is_foreign_and_never_blocks(tmp_path):
    for kind in ("fifo", "link"):
        out = tmp_path / kind / "stdouterr"
        out.mkdir(parents=True)
        if kind == "fifo":
            os.mkfifo(out / files.OWNER)  # an open for reading would wait for a writer
        else:
            (out / files.OWNER).symlink_to(tmp_path / "elsewhere")
        assert files.owner(out) == files.FOREIGN  # not this job's: its output is not shown
        files.claim(out, "new")  # set aside, not read
        assert files.owner(out) == "new"


def test_a_marker_left_empty_is_no_claim_to_the_directory(tmp_path):
    out = tmp_path / "stdouterr"
    out.mkdir()
    (out / files.OWNER).write_text("")  # its writer died, or its job emptied it
    (out / "stdout.txt").write_text("whose?\n")
    assert files.owner(out) is None
    files.claim(out, "new")
    assert files.owner(out) == "new" and not (out / "stdout.txt").exists()
    assert (tmp_path / f"stdouterr-{files.FOREIGN}/stdout.txt").read_text() == "whose?\n"
