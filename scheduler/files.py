"""A job's output files as the daemon reads them: where they are, and refusing any path that
would leave the job's directory.

Batch AI wrote stdout and stderr to `<stdOutErrPathPrefix>/<ws>/<exp>/<job>/<attempt>/
stdouterr/` and each output directory under its `pathPrefix`, normally on storage mounted on
every node and on the daemon. The daemon reads them through its own mount root (`[storage]
mount_root`, default `<state-dir>/mounts`), which stands for `$AZ_BATCHAI_MOUNT_ROOT`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from batchd.projections.model import Job
from batchd.scheduler import toolkits
from batchd.scheduler.schema import DocumentError

STDOUTERR = "stdouterr"
# in an attempt's stdouterr directory: the id of the job that writes it. A job name reused
# after its job was deleted leads to the same directory; the marker tells the two apart.
OWNER = ".batchd-job"
FOREIGN = "unknown"  # the owner of a marker that is not a plain file (a job replaced it)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
_JOB_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


# a file of task k > 0 of a multi-node job in their shared stdouterr directory
# (runtimes.output_suffix): stdout-k.txt, stderr-k.txt, stdout-prep-k.txt, stderr-prep-k.txt
_TASK_FILE = re.compile(r"(?:stdout|stderr)(?:-prep)?-([1-9][0-9]{0,5})\.txt")


def task_of(directory_id: str, relative: str) -> int:
    """The task that writes `relative` in output directory `directory_id`: k for task k's
    own stdouterr files, else 0 (the task whose node is asked for the rest)."""
    if directory_id.lower() != STDOUTERR:
        return 0
    match = _TASK_FILE.fullmatch(os.path.normpath(relative))
    return int(match[1]) if match else 0


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


def _expander(mount_root: Path, job: Job) -> Callable[[str], str]:
    return toolkits.expander({
        "AZ_BATCHAI_JOB_MOUNT_ROOT": str(mount_root / "jobs" / job.job_id),
        "AZ_BATCHAI_MOUNT_ROOT": str(mount_root),
    })  # fmt: skip


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


LINKED = "leads through a link, outside the job's output directory"
_UNDER = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_DIRECTORY = _UNDER | os.O_DIRECTORY
_LAST = _UNDER | os.O_NONBLOCK  # a FIFO the job made does not hold the reader


class Linked(ValueError):
    """A link (or a part that is not a plain name) on the way to a path: refused."""


def open_beneath(root: str | Path, parts: Sequence[str]) -> int:
    """A read-only descriptor of `root/parts[0]/.../parts[-1]` (a file or a directory),
    each part opened relative to the one before without following a link, so no link
    swapped in between a check and the open is ever followed: serve only from what this
    gives. `root` is trusted and opened as it is. Linked: a link on the way;
    FileNotFoundError, NotADirectoryError: nothing there (yet)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for index, part in enumerate(parts):
            if part in ("", ".", "..") or "/" in part:
                raise Linked(f"{part!r} is not a name in a directory")
            flags = _LAST if index == len(parts) - 1 else _DIRECTORY
            fd, parent = _open_part(part, flags, fd), fd
            os.close(parent)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_part(name: str, flags: int, directory: int) -> int:
    """`name` in `directory`; Linked where it is a link (ELOOP is O_NOFOLLOW's answer for
    one; with O_DIRECTORY it is ENOTDIR, so a failed open also looks at what is there)."""
    try:
        return os.open(name, flags, dir_fd=directory)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Linked(f"{name!r} is a link") from None
        with contextlib.suppress(OSError):  # only to tell why: the open has failed anyway
            if stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode):
                raise Linked(f"{name!r} is a link") from None
        raise


def open_inside(base: Path, relative: str, field: str, mount_root: Path) -> int:
    """A descriptor of `base / relative` (see `joined`), opened from the mount root with no
    link on the way (a job could make its own output a link to anywhere, at any moment);
    DocumentError names `field`."""
    target = joined(base, relative, field)
    below = os.path.relpath(target, os.path.normpath(mount_root))
    try:
        return open_beneath(mount_root, [] if below == "." else below.split(os.sep))
    except Linked:
        raise DocumentError(field, LINKED) from None


def open_absolute(path: str) -> int:
    """A descriptor of an absolute `path` with no link anywhere on it (see open_beneath)."""
    if not path.startswith("/"):
        raise Linked(f"{path!r} is not an absolute path")
    return open_beneath("/", [part for part in path.split("/") if part not in ("", ".")])


def owner(directory: Path) -> str | None:
    """The id of the job whose output `directory` (an attempt's stdouterr) holds; None when
    nothing says (no marker: the first job of its name wrote it, or nobody yet)."""
    return _marker(directory, tries=1) or None  # one being written is not read again


def _marker(directory: Path, tries: int = 20, wait_missing: bool = False) -> str | None:
    """The marker's text; "" if it stays empty (or, `wait_missing`, missing: its writer died,
    or the directory is a first job's), None if there is none (or no directory)."""
    for _ in range(tries):  # a marker is being written: read it again
        try:
            fd = os.open(directory / OWNER, _LAST)
        except (FileNotFoundError, NotADirectoryError):
            if not wait_missing or not directory.is_dir():
                return None
            time.sleep(0.01)
            continue
        except OSError:  # a link in its place (ELOOP): not a marker batchd wrote
            return FOREIGN
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # a FIFO would hold the reader
                return FOREIGN
            text = os.read(fd, 128).decode(errors="replace").strip()
        finally:
            os.close(fd)
        if text:
            return text
        time.sleep(0.01)
    return ""


def claim(directory: Path, job_id: str) -> None:
    """Make `directory` (an attempt's stdouterr) the output of job `job_id`, whose name an
    earlier job had (a name's first job makes its directories plainly: nobody else wrote
    them). An existing directory without this job's marker is the earlier job's: it is set
    aside as `<directory>-<its job id>` (`-unknown` without a marker), kept as any output
    is. The tasks of a multi-node job may claim one shared directory at once: the one that
    makes it writes the marker, the others find it. OSError: it cannot be written."""
    for _ in range(10):
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            directory.mkdir()
        except FileExistsError:
            other = _marker(directory, wait_missing=True)  # (another task's, being written)
            if other == job_id:
                return
            if other is not None:  # None: set aside by another task meanwhile: look again
                aside = other if _JOB_ID.fullmatch(other) else FOREIGN
                with contextlib.suppress(OSError):  # set aside by another task meanwhile
                    os.rename(directory, directory.with_name(f"{directory.name}-{aside}"))
            continue
        except FileNotFoundError:  # its parent set aside meanwhile: again
            continue
        with os.fdopen(os.open(directory / OWNER, _NEW_FILE, 0o644), "w") as handle:
            handle.write(job_id)
        return
    raise OSError(0, "another job's output is in the way", str(directory))


def regular(fd: int, relative: str) -> os.stat_result:
    """The status of an opened output file; FileNotFound for a directory, a FIFO, a device
    node or anything else that is not a plain file (a job can make one: never read it)."""
    info = os.fstat(fd)
    if stat.S_ISDIR(info.st_mode):
        raise FileNotFound(f"{relative!r} is a directory")
    if not stat.S_ISREG(info.st_mode):
        raise FileNotFound(f"{relative!r} is not a regular file")
    return info


def _undecoded(name: str) -> bool:
    """Did the name's bytes fail to decode (os.scandir keeps them as lone surrogates)?"""
    if name.isprintable():  # (the common case, and cheap: a surrogate is not printable)
        return False
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def listing(directory: int | Path) -> list[dict[str, Any]]:
    """The entries of `directory` (a path, or a descriptor from open_beneath): name, whether
    a directory, size and modification time, none of them followed through a link. Links
    are left out: they are not the job's files, and are never served; so are names that are
    not UTF-8, which no URL could ask for, and what is neither a file nor a directory (a
    FIFO, a socket), which is never served either."""
    out = []
    try:
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        raise FileNotFound("no such directory (yet)") from None
    for entry in entries:
        if entry.name == OWNER or entry.is_symlink() or _undecoded(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # removed since it was listed
            continue
        is_dir = stat.S_ISDIR(info.st_mode)
        if not (is_dir or stat.S_ISREG(info.st_mode)):  # a FIFO, a socket: nothing to serve
            continue
        out.append({"name": entry.name, "isDirectory": is_dir,
                    "contentLength": 0 if is_dir else info.st_size,
                    "lastModified": info.st_mtime})  # fmt: skip
    return out
