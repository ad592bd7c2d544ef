"""A job's output files as the daemon reads them: where they are, and refusing any path that
would leave the job's directory.

Batch AI wrote stdout and stderr to `<stdOutErrPathPrefix>/<ws>/<exp>/<job>/<attempt>/
stdouterr/` and each output directory under its `pathPrefix`, normally on storage mounted on
every node and on the daemon. The daemon reads them through its own mount root (`[storage]
mount_root`, default `<state-dir>/mounts`), which stands for `$AZ_BATCHAI_MOUNT_ROOT`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from batchd.projections.model import Job
from batchd.scheduler import toolkits
from batchd.scheduler.schema import DocumentError

STDOUTERR = "stdouterr"


class FileNotFound(LookupError):
    """No such output directory or file (404)."""


def output_dir(spec: dict[str, Any], job: Job, directory_id: str, attempt: int,
               mount_root: Path) -> Path:  # fmt: skip
    """The directory of output `directory_id` (`stdouterr` or an outputDirectories id); it
    must lie on the storage the daemon reads (under `mount_root`)."""
    expand = _expander(mount_root, job)
    identity = toolkits.JobIdentity(job.workspace, job.experiment, job.name, job.job_id, attempt)
    if directory_id.lower() == STDOUTERR:
        prefix = spec.get("stdOutErrPathPrefix")
        if not prefix:
            raise FileNotFound("the job has no stdOutErrPathPrefix")
        return _on_storage(toolkits.stdouterr_dir(expand(prefix), identity), mount_root)
    for item in spec.get("outputDirectories") or ():
        if isinstance(item, dict) and str(item.get("id", "")).lower() == directory_id.lower():
            path = toolkits.output_path(expand(item["pathPrefix"]), item.get("pathSuffix"),
                                        identity)  # fmt: skip
            return _on_storage(path, mount_root)
    raise FileNotFound(f"the job has no output directory {directory_id!r}")


class OffStorage(LookupError):
    """The job's output directory is not on the daemon's storage: its node has it."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} is not on the storage the daemon reads")
        self.path = path


def _on_storage(path: str, mount_root: Path) -> Path:
    normal = Path(os.path.normpath(path))
    if not normal.is_relative_to(os.path.normpath(mount_root)):
        raise OffStorage(normal)
    return normal


def _expander(mount_root: Path, job: Job):
    known = {
        "$AZ_BATCHAI_JOB_MOUNT_ROOT": str(mount_root / "jobs" / job.job_id),
        "$AZ_BATCHAI_MOUNT_ROOT": str(mount_root),
    }

    def expand(text: str) -> str:
        for name, value in known.items():  # the longer name first
            text = text.replace("${" + name[1:] + "}", value).replace(name, value)
        return text

    return expand


def joined(base: Path, relative: str, field: str) -> Path:
    """`base / relative`, refusing absolute paths, `..`, NUL and backslashes by `field`."""
    if "\x00" in relative or "\\" in relative:
        raise DocumentError(field, "must not contain NUL or backslashes")
    if relative.startswith("/"):
        raise DocumentError(field, "must be relative to the output directory")
    parts = [p for p in relative.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise DocumentError(field, "must not contain '..'")
    return base.joinpath(*parts)


def unlinked(path: Path) -> bool:
    """Whether no link leads anywhere on the way to `path` (its real path is itself)."""
    return os.path.realpath(path) == os.path.normpath(os.path.abspath(path))


def inside(base: Path, relative: str, field: str, mount_root: Path) -> Path:
    """`base / relative`, refusing absolute paths, `..`, and any link on the way from the
    mount root (a job could make its own output a link to anywhere); DocumentError names
    `field`."""
    target = joined(base, relative, field)
    root = os.path.normpath(mount_root)
    expected = os.path.join(os.path.realpath(root), os.path.relpath(target, root))
    if os.path.realpath(target) != os.path.normpath(expected):
        raise DocumentError(field, "leads through a link, outside the job's output directory")
    return target


def listing(directory: Path) -> list[dict[str, Any]]:
    """The entries of `directory`: name, whether a directory, size and modification time."""
    if not directory.is_dir():
        raise FileNotFound("no such directory (yet)")
    out = []
    with os.scandir(directory) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            stat = entry.stat()
            out.append({"name": entry.name, "isDirectory": entry.is_dir(),
                        "contentLength": 0 if entry.is_dir() else stat.st_size,
                        "lastModified": stat.st_mtime})  # fmt: skip
    return out
