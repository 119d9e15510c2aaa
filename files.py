"""Files read and written safely: atomic writes, one run per folder, regular files only.

A write goes to a temporary file beside its target, is synced and renamed over it, so a
crash leaves the old file or the new one, never a torn one. A run holds its folder with an
flock that the kernel drops when the process dies. A file a user hands us is opened only if
it is a regular file: a FIFO or a device would block or never end.
"""
import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile

from cli import Error, shown

def writable_folder(path):
    """Create folder `path` if needed and prove that it takes files, before any work is done."""
    path = path or "."
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise Error(f"cannot write to the folder {path}: {exc.strerror or exc}") from None


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file beside `path`; on success it replaces `path` in one step.

    A crash or an exception leaves the old file (or none), never a half-written one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                   suffix=".tmp")
    except OSError as exc:
        raise Error(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
        _sync_folder(folder)
    except OSError as exc:
        _remove(tmp)
        raise Error(f"cannot write {path}: {exc.strerror or exc}") from exc
    except BaseException:
        _remove(tmp)
        raise


_UMASK = os.umask(0)
os.umask(_UMASK)


def _sync_folder(folder):
    """Make a rename in `folder` survive a power cut (a crash of the process needs nothing)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open a folder: nothing to do
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename stands anyway
        pass
    finally:
        os.close(fd)


def _remove(path):
    with contextlib.suppress(OSError):
        os.remove(path)


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# --- one run per folder ------------------------------------------------------------------------


def flocked(path, wait=True):
    """`path` (created if needed) open and holding an exclusive flock, which dies with the
    process; None if another holds it and `wait` is False."""
    f = open(path, "ab")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return f
    except BlockingIOError:
        f.close()


@contextlib.contextmanager
def folder_lock(folder, what="--save-dir"):
    """Hold `folder` for this process: another live process holding it is refused at once.

    The lock is an flock on folder/.lock, which the kernel drops when its holder dies,
    so a killed run never blocks the next one.
    """
    writable_folder(folder)
    path = os.path.join(folder or ".", ".lock")
    try:  # never through a link, never a FIFO or device: it is written to
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o644)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise OSError(errno.EINVAL, "not a regular file")
    except OSError as exc:
        raise Error(f"cannot use {shown(path)} as the folder's lock: "
                    f"{exc.strerror or exc}; remove it") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise Error(f"{shown(folder)} is in use by another run (pid {shown(holder)}); "
                        f"wait for it to finish or choose another {what}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def remove_stale_temps(folder, names):
    """Delete the temporary files that a killed `atomic_write` of `names` left in `folder`.

    Call it only while holding the folder (`folder_lock`): no live writer then owns one.
    """
    for entry in os.scandir(folder or "."):
        if entry.name.endswith(".tmp") and any(entry.name.startswith(f".{name}.")
                                               for name in names):
            _remove(entry.path)



# --- files opened for reading ----------------------------------------------------------------


def open_regular(path, max_bytes=None):
    """Open `path` for binary reading only if it is a regular file (of at most `max_bytes`).

    A FIFO, a device or a folder would block or never end; the O_NONBLOCK open and the fstat
    of the opened descriptor leave no window for a swap. Raises OSError naming what is wrong.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO"
                    if stat.S_ISFIFO(info.st_mode) else "a device or other special file")
            raise OSError(errno.EINVAL, f"not a regular file but {kind}", os.fspath(path))
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{info.st_size} bytes, more than the {max_bytes} "
                          f"it may hold", os.fspath(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
