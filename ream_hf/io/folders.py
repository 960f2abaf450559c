"""Where a run may write, and how, so that no user data is ever lost.

- `check_paths`: an output or work folder that equals, contains or lies inside the source (symlinks resolved; a
  Hub source's cache folder `models--owner--name` counts as the source) is refused before anything is read.
- `run_lock`: one run per output folder and per work folder (an flock'ed lock file naming the holder).
- `check_output_dir` / `atomic_output_dir`: an output is written to a temporary sibling and moved into place only
  once complete and verified; `--overwrite` swaps it in atomically, so a kill at any moment leaves a complete
  folder (the old or the new), and leftovers of an interrupted run are recovered by the next run on that output.
- `storage_errors`: a write that fails for space, quota or permission ends in one line naming the path and the
  space the run needs.
- `fsync_file` / `fsync_folder` / `fsync_tree` / `write_durably`: a rename is atomic against a kill, not against a
  power loss or a lost VM, after which a renamed file may name bytes that never reached the disk. So a file's bytes
  are flushed before anything records it (a work folder's commit, the output's final rename), and a folder's entries
  after a rename in it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ..kill_points import kill_point
from .names import HUB_CACHE_FOLDER, MANIFEST_NAME, looks_like_hub_id

logger = logging.getLogger(__name__)


# -- durability ----------------------------------------------------------------------------------------------
def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: str | os.PathLike) -> None:
    """Flush a folder's entries (the files created, renamed or removed in it) to the disk. A no-op where folders
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike) -> None:
    """Flush every file under `folder`, then every folder, deepest first (each after the entries it holds)."""
    folder = Path(folder)
    folders = [folder]
    for path in sorted(folder.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            folders.append(path)
        elif path.is_file() and not path.is_symlink():
            fsync_file(path)
    for path in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        fsync_folder(path)


def write_durably(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically and durably: a temporary sibling written and flushed, renamed over `path`,
    then the folder flushed (the rename itself on disk)."""
    temp = path.with_name(path.name + ".tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temp, path)
    fsync_folder(path.parent)


# -- the source is never written ---------------------------------------------------------------------------
def source_folders(source: str | os.PathLike) -> list[tuple[Path, bool]]:
    """The folders holding a source's files, symlinks resolved, each with whether writing *inside* it is refused
    too (`True`: the source folder and its Hub cache folder) or only replacing it (`False`: folders its symlinked
    files point into, e.g. a Hub cache's blobs; an output beside such a file harms nothing).

    A Hub id that is not a local path is its cache folder (HF_HUB_CACHE/models--owner--name), computed without
    downloading anything, so a bad output is refused before the download."""
    text = str(source)
    path = Path(text).expanduser()
    if not path.exists():
        if not looks_like_hub_id(text):
            return []
        from huggingface_hub import constants

        return [((Path(constants.HF_HUB_CACHE) / ("models--" + text.replace("/", "--"))).resolve(), True)]
    folder = path.resolve()
    found: list[tuple[Path, bool]] = [(folder, True)]
    parts = folder.parts
    for i in range(len(parts) - 1):
        if HUB_CACHE_FOLDER.match(parts[i]) and parts[i + 1] == "snapshots":
            found.append((Path(*parts[: i + 1]), True))
    if folder.is_dir():
        for item in folder.iterdir():
            if item.is_symlink():
                target = item.resolve()
                found.append((target if target.is_dir() else target.parent, False))
    unique: dict[Path, bool] = {}
    for folder_, strict in found:
        unique[folder_] = unique.get(folder_, False) or strict
    return list(unique.items())


def check_paths(source: str | os.PathLike, *, output: str | os.PathLike | None = None,
                work: str | os.PathLike | None = None) -> None:
    """Refuse an output or work folder that is, contains or lies inside the source, or that overlap each other.

    Run before anything is read or written: `--output PARENT --overwrite` would delete the source with PARENT,
    `--output SRC` would replace it, `--output SRC/out` would write into it."""
    protected = source_folders(source)
    targets = [(what, Path(path).expanduser().resolve(), path) for what, path in
               (("output folder", output), ("work folder", work)) if path is not None]
    for what, target, given in targets:
        for folder, strict in protected:
            if target == folder and strict:
                raise ValueError(f"{what} {given} is the source model's folder {folder}: writing there would destroy "
                                 "the model being compressed; choose another folder")
            if target == folder or target in folder.parents:
                raise ValueError(f"{what} {given} contains the source model's files ({folder}): replacing it would "
                                 "delete them; choose a folder outside it")
            if strict and folder in target.parents:
                raise ValueError(f"{what} {given} lies inside the source model's folder {folder}; the source is never "
                                 "modified: choose a folder outside it")
    if len(targets) == 2:
        (_, out, out_given), (_, work_path, work_given) = targets
        if out == work_path or out in work_path.parents or work_path in out.parents:
            raise ValueError(f"work folder {work_given} and output folder {out_given} overlap; put the work folder "
                             f"beside the output (the default is .{out.name}.ream-work)")


# -- one run per folder -------------------------------------------------------------------------------------
@dataclass
class _Held:
    fd: int | None  # None where the filesystem cannot lock (the run goes on, unguarded)
    count: int


_held: dict[str, _Held] = {}


def _holder_text(info: dict) -> str:
    started = info.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {when}"


def _read_holder(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        info = json.loads(data.decode()) if data else {}
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(lock_file: str | os.PathLike, what: str) -> None:
    """Take the lock `lock_file` for this process (re-entrant), or refuse naming the run that holds it.

    The lock is `fcntl.flock` on the file, not the file's existence: the kernel drops it the moment its holder dies
    (SIGKILL, OOM killer, a lost machine's NFS lease), so a killed run never blocks the next one and there is no
    pid-guessing to get wrong. The file records pid, host and start time only to name the holder in the refusal
    (never the command line, which could carry a token); a record left by a run that died is reported and replaced.
    Where the filesystem cannot lock at all, a warning is logged and the run goes on unguarded."""
    path = Path(lock_file).absolute()
    key = str(path)
    if key in _held:
        _held[key].count += 1
        return
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ValueError(f"{what} is in use by another ream-hf run ({_holder_text(holder)}); wait for it to "
                             "finish or stop it, then run again (with --resume to continue its work)") from None
        except OSError as error:
            os.close(fd)
            logger.warning("cannot lock %s (%s): a second run on the same folder would not be detected", path,
                           error.strerror)
            _held[key] = _Held(None, 1)
            return
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file between our open and our lock: lock the new one
    previous = _read_holder(fd)
    if previous.get("pid") is not None and previous.get("pid") != os.getpid():
        state = "is no longer running" if previous.get("host") == socket.gethostname() and \
            isinstance(previous.get("pid"), int) and not _alive(previous["pid"]) else "no longer holds it"
        logger.warning("%s: took over the lock of an earlier run that %s (%s)", what, state, _holder_text(previous))
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    _held[key] = _Held(fd, 1)


def release_lock(lock_file: str | os.PathLike) -> None:
    """Release one hold of `lock_file`; the last one removes the file and drops the lock."""
    key = str(Path(lock_file).absolute())
    held = _held.get(key)
    if held is None:
        return
    held.count -= 1
    if held.count > 0:
        return
    del _held[key]
    if held.fd is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(key)  # before closing: a waiter that opened this file sees it is gone and retries
        os.close(held.fd)


@contextlib.contextmanager
def run_lock(lock_file: str | os.PathLike, what: str) -> Iterator[None]:
    acquire_lock(lock_file, what)
    try:
        yield
    finally:
        release_lock(lock_file)


def output_lock_file(output: Path) -> Path:
    """The lock of an output folder: a hidden sibling, so it also guards an output that does not exist yet."""
    return output.parent / f".{output.name}.ream-lock"


@contextlib.contextmanager
def output_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold the output folder's lock (its parent folder is created if missing)."""
    output = Path(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    with run_lock(output_lock_file(output), f"output folder {output}"):
        yield


# -- atomic output folders ----------------------------------------------------------------------------------
def _sibling(output: Path, kind: str) -> Path:
    return output.parent / f".{output.name}.ream-{kind}-{os.getpid()}"


def _leftovers(output: Path, kind: str) -> list[Path]:
    pattern = f".{glob.escape(output.name)}.ream-{kind}-*"
    return sorted(output.parent.glob(pattern), key=lambda p: p.stat().st_mtime)


def recover_output(output: Path) -> None:
    """Finish what an interrupted run left beside `output` (call with the output's lock held).

    `.NAME.ream-tmp-PID` is a new output being written, or (after an atomic exchange) the replaced one being
    removed: deleted. `.NAME.ream-old-PID` is a replaced output moved aside where no atomic exchange exists: put
    back if `NAME` is missing (the kill came between the two renames), else deleted. Each step is logged."""
    if not output.parent.is_dir():
        return
    asides = _leftovers(output, "old")
    if asides and not output.exists():
        os.rename(asides[-1], output)
        logger.warning("restored %s from %s, where an interrupted --overwrite run had moved it aside", output,
                       asides[-1].name)
        asides = asides[:-1]
    for leftover in [*asides, *_leftovers(output, "tmp")]:
        shutil.rmtree(leftover, ignore_errors=True)
        logger.warning("removed %s, left beside %s by an interrupted run", leftover.name, output)


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output the run may not write, before any work: an existing folder without `overwrite`, a file or
    symlink, a folder ream-hf did not write (`overwrite` replaces only an earlier ream-hf output or an empty
    folder), a parent that is a file or not writable. Leftovers of an interrupted run are recovered first."""
    output = Path(output_dir)
    if str(output_dir) == "":
        raise ValueError("the output folder is empty; give a folder name")
    if output.is_symlink():
        raise ValueError(f"output path {output} is a symbolic link; give the folder it points to ({output.resolve()})")
    ancestor = output.parent.absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot create output folder {output}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write output folder {output}: {ancestor} is not writable; choose another place")
    if output.parent.is_dir():
        with run_lock(output_lock_file(output), f"output folder {output}"):
            recover_output(output)
    if output.exists():
        if not output.is_dir():
            raise ValueError(f"output path {output} exists and is not a folder")
        if not overwrite:
            raise ValueError(f"output folder {output} already exists; choose another or pass --overwrite")
        foreign = None if (output / MANIFEST_NAME).is_file() else next(iter(sorted(output.iterdir())), None)
        if foreign is not None:
            raise ValueError(f"output folder {output} holds files ream-hf did not write (e.g. {foreign.name}); --overwrite "
                             "replaces only an earlier ream-hf output: choose another output folder")
    return output


RENAME_EXCHANGE = 2  # linux/fs.h
AT_FDCWD = -100


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two folders in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`, filesystems that support it); False
    where the OS, the C library or the filesystem cannot, for the caller to fall back on two renames."""
    if sys.platform != "linux":
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def move_into_place(temp: Path, output: Path) -> None:
    """Put the complete folder `temp` at `output` (its files flushed to disk first, the parent folder after),
    replacing an existing one without ever leaving no complete folder:
    an atomic exchange where the filesystem has one; else old moved aside, new renamed in, old removed (a kill
    between the two renames leaves the old folder aside, which `recover_output` puts back)."""
    fsync_tree(temp)  # every byte on disk before the rename makes the folder the output
    if not output.exists():
        os.rename(temp, output)
        fsync_folder(output.parent)
        kill_point("output-renamed")
        return
    if exchange_paths(temp, output):  # output is the new folder, temp the old one
        fsync_folder(output.parent)
        kill_point("output-renamed")
        shutil.rmtree(temp)
        return
    aside = _sibling(output, "old")
    os.rename(output, aside)
    kill_point("overwrite-moved-aside")
    os.rename(temp, output)
    fsync_folder(output.parent)
    kill_point("output-renamed")
    shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_output_dir(output_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling folder, moved into place (`move_into_place`) only if the block finishes: a crash or a
    failed write leaves no partial output, and an existing output stays whole until the new one replaces it."""
    output = Path(output_dir)
    with output_lock(output):
        check_output_dir(output, overwrite)
        temp = _sibling(output, "tmp")
        temp.mkdir()
        try:
            yield temp
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        kill_point("output-verified")
        move_into_place(temp, output)


# -- write failures -----------------------------------------------------------------------------------------
STORAGE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                  errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                  errno.EROFS: "read-only file system", errno.EFBIG: "file too large"}


class StorageError(Exception):
    """A write failed for space, quota or permission. The message is one line; the partial output is gone and the
    work folder holds every committed layer, so the same command with --resume continues once it is fixed."""


@dataclass(frozen=True)
class SpaceNeeded:
    """What a run writes, estimated from the source's tensor sizes and the target before work starts."""

    output: int  # the compressed checkpoint
    work: int = 0  # calibration hidden states in the work folder (two layer boundaries at a time)

    def describe(self) -> str:
        if not self.work:
            return f"about {short_bytes(self.output)} for the compressed checkpoint"
        return (f"about {short_bytes(self.output + self.work)} ({short_bytes(self.output)} for the compressed "
                f"checkpoint, {short_bytes(self.work)} for calibration hidden states in the work folder)")


def short_bytes(n: int) -> str:
    for scale, suffix in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}"
    return f"{n} B"


def _free_bytes(path: Path) -> int | None:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


@contextlib.contextmanager
def storage_errors(needed: Callable[[], SpaceNeeded | None], folder: Path, resume_hint: str | None = None
                   ) -> Iterator[None]:
    """Turn a failed write (no space, quota, permission) inside the block into a one-line `StorageError` naming the
    path, the space the run needs (`needed()`, evaluated only then) and what is free there."""
    try:
        yield
    except OSError as error:
        if error.errno not in STORAGE_ERRNOS:
            raise
        path = Path(error.filename) if error.filename else folder
        free = _free_bytes(path)
        estimate = needed()
        parts = [f"cannot write {path}: {STORAGE_ERRNOS[error.errno]}"]
        if estimate is not None:
            parts.append(f"the run needs {estimate.describe()}"
                         + ("" if free is None else f", and {short_bytes(free)} is free there now"))
        fix = "make it writable" if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "free some space"
        parts.append(f"{fix} or choose other folders, then run the same command"
                     + (f" with --resume ({resume_hint})" if resume_hint else " again"))
        raise StorageError("; ".join(parts)) from None
