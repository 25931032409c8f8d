"""Files that a crash never leaves torn: the one write protocol of every output a run keeps
(checkpoints, weights, config.yaml, metrics, summaries, score arrays).

The bytes go to a temporary file in the target's directory (same file system, so the rename is
atomic), are flushed and fsynced, the file is renamed over the target, and the directory is
fsynced so that the rename survives a power cut. A failure at any point removes the temporary
file; a full disk is named as such, with the way to continue.
"""
from __future__ import annotations

import errno
import glob
import os
import socket

__all__ = ["atomic_write", "atomic_write_bytes", "write_synced", "fsync_dir", "temp_path", "remove_stale_temps"]

# The host is in a temporary name: a folder shared between machines (a teacher-logit cache on a
# network file system) holds other hosts' writes, whose pids mean nothing here.
_HOST = socket.gethostname().replace(os.sep, "_") or "host"


def fsync_dir(directory: str) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path(path: str) -> str:
    """The hidden temporary name beside ``path`` that this process writes it through."""
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.join(directory, f".{os.path.basename(path)}.tmp.{_HOST}.{os.getpid()}")


def remove_stale_temps(directory: str, pattern: str) -> None:
    """Removes the temporary files (``temp_path``) of ``pattern``'s files in ``directory`` that a
    process on this host left when it was killed mid-write: only those whose process is gone, so a
    folder other processes write into at the same time (a shared cache) keeps their files."""
    prefix = f".tmp.{_HOST}."
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{pattern}.tmp.*")):
        head, sep, pid = stale.rpartition(".")
        if not head.endswith(prefix[:-1]) or not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or not ours to signal): its write may still be under way
        except ProcessLookupError:
            pass
        except OSError:
            continue
        try:
            os.unlink(stale)
        except OSError:
            pass


def write_synced(tmp: str, write, final: str) -> None:
    """``write(fh)`` into ``tmp``, flushed and fsynced, for a rename to ``final``. On any failure
    the partial ``tmp`` is removed; an OSError (a full disk, a quota) is raised again naming
    ``final``: the files written before it are intact."""
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if not isinstance(exc, OSError):
            raise  # the writer's own error (an object that cannot be pickled, an interrupt)
        hint = (" (no space left on the device: the files written before this one are intact; free "
                "space, then continue with --resume)" if exc.errno == errno.ENOSPC else "")
        raise OSError(exc.errno, f"could not write {final}: {exc.strerror or exc}{hint}") from exc


def atomic_write(path: str, write) -> None:
    """``write(fh)`` (a binary file) to a synced temp file renamed over ``path``: a crash leaves
    the old file or the new one, never a torn one (the rename is synced too)."""
    tmp = temp_path(path)
    write_synced(tmp, write, path)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(data: bytes, path: str) -> None:
    """``data`` as the whole of ``path``, written by :func:`atomic_write`."""
    atomic_write(path, lambda fh: fh.write(data))
