"""Files read and written safely: atomic writes, one run per folder, regular files only.

A write goes to a temporary file beside its target, is synced and renamed over it, so a
crash leaves the old file or the new one, never a torn one; the writer locks its temporary
file, so that a sweep removes only those of dead writers. A run holds its folder, the folder
itself by device and inode, with an flock that the kernel drops when the process dies. A
file a user hands us is opened only if it is a regular file: a FIFO or a device would block
or never end.
"""
import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import secrets
import stat
import tempfile
import time

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

    A crash or an exception leaves the old file (or none), never a half-written one. In a
    folder this process holds (`folder_lock`), the folder must still be the one it locked,
    and the file goes into that very folder. The temporary file is locked while it lives, so
    that `remove_stale_temps` leaves it alone.
    """
    folder, name = os.path.split(os.path.abspath(path))
    with _folder_fd(folder, path) as dir_fd:
        try:
            tmp, fd = _locked_temp(name, dir_fd)
        except OSError as exc:
            raise _write_error(path, folder, exc) from exc
        lock = os.dup(fd)  # the temporary file stays locked until it is renamed
        try:
            with os.fdopen(fd, mode) as f:
                yield f
                f.flush()
                os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # it was made 0600
                os.fsync(f.fileno())
            os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            _sync_folder(dir_fd)
        except OSError as exc:
            _remove(tmp, dir_fd)
            raise _write_error(path, folder, exc) from exc
        except BaseException:
            _remove(tmp, dir_fd)
            raise
        finally:
            os.close(lock)


def _write_error(path, folder, exc):
    """The error of a failed write: the folder's going, if that is why (FolderMoved)."""
    check_folder(folder)
    if exc.errno == errno.ENOENT and os.path.abspath(folder) in _held:
        # Our own file vanished: the folder is likely being deleted, its files first.
        for _ in range(20):
            time.sleep(0.05)
            check_folder(folder)
    return Error(f"cannot write {path}: {exc.strerror or exc}")


_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def _folder_fd(folder, path):
    """An open descriptor of `folder` to write `path` in: the held one, checked to be still
    in place; else the folder's own, created if needed."""
    if folder in _held:
        check_folder(folder)
        yield _held[folder]
        return
    try:
        os.makedirs(folder, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise Error(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        yield fd
    finally:
        os.close(fd)


def _locked_temp(name, dir_fd):
    """A new hidden temporary file for `name` in the folder `dir_fd`, exclusively flocked:
    (its name, its descriptor). Made again if a sweep removed it before it was locked."""
    while True:
        tmp = f".{name}.{secrets.token_hex(4)}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=dir_fd)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return tmp, fd
        os.close(fd)


def _sync_folder(dir_fd):
    """Make a rename in the folder `dir_fd` survive a power cut (a crash needs nothing)."""
    with contextlib.suppress(OSError):  # some file systems refuse fsync on a folder
        os.fsync(dir_fd)


def _remove(name, dir_fd=None):
    with contextlib.suppress(OSError):
        os.remove(name, dir_fd=dir_fd)


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


# --- one run per folder ------------------------------------------------------------------------


def flocked(path, wait=True):
    """`path` (created if needed, a regular file) open and holding an exclusive flock, which
    dies with the process; None if another holds it and `wait` is False."""
    f = open_regular(path, mode="ab")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return f
    except BlockingIOError:
        f.close()


_held = {}  # the absolute path of each folder this process holds -> an open descriptor of it


class FolderMoved(Error):
    """The folder a run holds was moved or deleted while it ran."""


@contextlib.contextmanager
def folder_lock(folder, what="--save-dir"):
    """Hold `folder` for this process: another live process holding it is refused at once.

    The lock is an flock on folder/.lock, which the kernel drops when its holder dies,
    so a killed run never blocks the next one. The folder itself (its device and inode) is
    what is held: `atomic_write` checks before each write that `folder` still names it, and
    writes into it.
    """
    writable_folder(folder)
    path = os.path.abspath(folder or ".")
    lock_path = os.path.join(folder or ".", ".lock")
    dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:  # never through a link, never a FIFO or device: it is written to
            lock = open_regular(".lock", mode="r+b", dir_fd=dir_fd, create=True, follow=False)
            if os.fstat(lock.fileno()).st_nlink > 1:
                lock.close()
                raise OSError(errno.EMLINK, "it is a hard link to another file")
        except OSError as exc:
            raise Error(f"cannot use {shown(lock_path)} as the folder's lock: "
                        f"{exc.strerror or exc}; remove it") from None
        with lock:
            if not _take_lock(lock):
                raise Error(f"{shown(folder)} is in use by another run (pid "
                            f"{shown(_holder(lock))}); wait for it to finish or choose "
                            f"another {what}")
            with _holding(path, dir_fd):
                yield _identity(os.fstat(dir_fd))
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def held_elsewhere(folder, identity):
    """Hold `folder` in a helper of the process that locked it, whose `folder_lock` yielded
    its `identity`: writes here check it and go into it, as the locker's do. No `identity`,
    no holding."""
    if identity is None:
        yield
        return
    path = os.path.abspath(folder or ".")
    try:
        dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        raise _moved(folder) from None
    try:
        if _identity(os.fstat(dir_fd)) != tuple(identity):
            raise _moved(folder)
        with _holding(path, dir_fd):
            yield
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _holding(path, dir_fd):
    _held[path] = dir_fd
    try:
        yield
    finally:
        del _held[path]


def _identity(info):
    return info.st_dev, info.st_ino


def _take_lock(lock):
    """Take the flock of the open lock file `lock` and write this pid into it (first, then
    cut: a reader never sees it empty); False if another process holds it."""
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    pid = f"{os.getpid()}\n".encode()
    os.pwrite(lock.fileno(), pid, 0)
    os.ftruncate(lock.fileno(), len(pid))
    return True


def _holder(lock, wait=1.0):
    """The pid the holder of `lock` wrote; a lock just taken is given `wait` seconds to say."""
    deadline = time.monotonic() + wait
    while True:
        pid = os.pread(lock.fileno(), 32, 0).decode(errors="replace").split("\n")[0].strip()
        if pid or time.monotonic() > deadline:
            return pid or "unknown"
        time.sleep(0.01)


def check_folder(folder):
    """Refuse (FolderMoved) to go on in a held `folder` that is no longer the one locked (a
    folder this process does not hold passes)."""
    path = os.path.abspath(folder or ".")
    if path not in _held:
        return
    try:
        same = _identity(os.stat(path)) == _identity(os.fstat(_held[path]))
    except OSError:
        same = False
    if not same:
        raise _moved(folder)


def _moved(folder):
    error = FolderMoved(f"{shown(folder)} was moved or deleted while this run held it: "
                        f"stopped, and nothing was written elsewhere (what was saved went "
                        f"with the folder)")
    error.__cause__ = OSError(errno.ESTALE, "folder moved")  # the machine's doing, not a value's
    return error


def remove_stale_temps(folder, names):
    """Delete the temporary files that a killed `atomic_write` of `names` (file names or
    patterns such as "val_acc_*.png") left in `folder`. A live writer holds a lock on its
    temporary file: it is left alone, whoever wrote it."""
    with _folder_fd(os.path.abspath(folder or "."), folder) as dir_fd:
        for entry in os.scandir(dir_fd):
            if any(fnmatch.fnmatchcase(entry.name, f".{name}.*.tmp") for name in names):
                with contextlib.suppress(OSError):  # gone meanwhile, or not ours to remove
                    fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                                 | os.O_CLOEXEC, dir_fd=dir_fd)
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a live writer: refused
                        os.remove(entry.name, dir_fd=dir_fd)
                    finally:
                        os.close(fd)


# --- files opened for reading ----------------------------------------------------------------


_MODES = {"rb": os.O_RDONLY, "r+b": os.O_RDWR, "ab": os.O_WRONLY | os.O_APPEND | os.O_CREAT}


def open_regular(path, max_bytes=None, mode="rb", dir_fd=None, create=False, follow=True):
    """Open `path` ("rb", "r+b" or "ab") only if it is a regular file (of at most `max_bytes`).

    A FIFO, a device or a folder would block or never end; the O_NONBLOCK open and the fstat
    of the opened descriptor leave no window for a swap. `create` makes a missing file, and
    "ab" always does; `follow=False` refuses a link. Raises OSError naming what is wrong.
    """
    flags = (_MODES[mode] | (os.O_CREAT if create else 0) | (0 if follow else os.O_NOFOLLOW)
             | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        fd = os.open(path, flags, 0o644, dir_fd=dir_fd)
    except OSError as exc:  # a FIFO without a reader, opened to write, is ENXIO
        if exc.errno == errno.ENXIO:
            raise _not_regular(path, os.stat(path, dir_fd=dir_fd)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info)
        if max_bytes is not None and info.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{info.st_size} bytes, more than the {max_bytes} "
                          f"it may hold", os.fspath(path))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, mode)  # which owns fd: closed once, even if a signal cuts in here


def _not_regular(path, info):
    kind = ("a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO"
            if stat.S_ISFIFO(info.st_mode) else "a device or other special file")
    return OSError(errno.EINVAL, f"not a regular file but {kind}", os.fspath(path))
