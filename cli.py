"""What every script shares at its edge: one-line errors, exit codes, options, atomic writes.

A failure the user can act on raises `Error`; `run` prints it as a single
`error: ...` line on stderr and exits 1. Usage errors exit 2. `--debug` (or
the environment variable MLP_DEBUG=1) shows the full traceback instead.
"""
import argparse
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import stat
import sys
import tempfile
import threading
import traceback


class Error(Exception):
    """A failure with a message the user can act on (bad file, bad value, no data)."""


class UsageError(Error):
    """A bad command-line value found after parsing: exits 2, as argparse's errors do."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default in its help, unless the default is nothing (None, False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse with the project's error format (one `error:` line, exit 2) and every
    option's default shown in its help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="show the full traceback on errors (also: MLP_DEBUG=1)")

    def error(self, message):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _parse_bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_options(parser, defaults, helps, choices=None, aliases=None):
    """Add one `--key` option per configuration key, typed from its default value.

    An option the user does not give is absent from the parsed arguments (see `overrides`),
    so presets can fill it; `aliases` maps other accepted names to keys.
    """
    choices, aliases = choices or {}, aliases or {}
    for key, default in defaults.items():
        flags = ["--" + name.replace("_", "-") for name in [key, *aliases_of(key, aliases)]]
        kwargs = dict(default=argparse.SUPPRESS, dest=key, choices=choices.get(key),
                      help=f"{helps[key]} (default: {default})")
        if isinstance(default, bool):
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif isinstance(default, (list, tuple)):
            kwargs.update(type=type(default[0]), nargs="+")
        elif default is None:
            kwargs.update(type=str)
        else:
            kwargs.update(type=type(default))
        parser.add_argument(*flags, **kwargs)


def bounded(kind, low, high=None):
    """An argparse type: a number of `kind` (int or float) from low to high (nan fails)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}"
                                             f", got {text!r}") from None
        if not low <= value <= (high or sys.float_info.max):
            bounds = f"in [{low}, {high}]" if high else "positive" if low > 0 else ">= 0"
            raise argparse.ArgumentTypeError(f"must be {bounds}, got {text}")
        return value
    return parse


def aliases_of(key, aliases):
    return [alias for alias, target in aliases.items() if target == key]


def overrides(args, defaults):
    """The configuration keys the user gave on the command line, as a dict."""
    return {key: value for key, value in vars(args).items() if key in defaults}


def run(main, argv=None):
    """Call `main(argv)` and turn failures into the project's error lines and exit codes."""
    argv = sys.argv[1:] if argv is None else argv
    stop_on_signals()
    debug = "--debug" in argv or os.environ.get("MLP_DEBUG", "") not in ("", "0")
    try:
        code = main(argv)
    except Error as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {one_line(exc)}\n")
        code = 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM/SIGHUP as Stopped
        sys.stderr.write(f"error: {exc if isinstance(exc, Stopped) else 'interrupted'}\n")
        code = 128 + getattr(exc, "signum", signal.SIGINT)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except Exception as exc:  # an unexpected failure: still one line unless debugging
        if debug:
            raise
        sys.stderr.write(f"error: {type(exc).__name__}: {one_line(exc)} "
                         "(run with --debug for the traceback)\n")
        code = 1
    sys.exit(code or 0)


def one_line(exc):
    """The message of `exc` on one line, however many lines it holds."""
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


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


# --- signals and one run per folder -----------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that it stops as on Ctrl-C."""

    def __init__(self, signum):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


stop_signal = 0  # the first signal caught: start no new work (checked at safe points too)
_deferred = {"depth": 0, "pending": False}  # see signals_deferred


def _stop_once(signum, frame):
    """Raise Stopped for the first signal only, so a second cannot cut short the cleanup;
    inside signals_deferred, only note it."""
    global stop_signal
    if stop_signal:
        return
    stop_signal = signum
    if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail (EIO)
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            with contextlib.suppress(OSError):  # a hung-up terminal is no longer a "tty"
                if stat.S_ISCHR(os.fstat(fd).st_mode):
                    os.dup2(devnull, fd)
        os.close(devnull)
    if _deferred["depth"]:
        _deferred["pending"] = True
    else:
        raise Stopped(signum)


_relayed = []  # (pid, parent) pairs that stop_on_signals has set up


def stop_on_signals(parent=None):
    """Stop once on SIGINT, SIGTERM or SIGHUP (unless ignored, as under nohup), and when
    process `parent` is gone. CPython may drop the exception (e.g. inside an import):
    check `stop_signal` at safe points too."""
    if (os.getpid(), parent) in _relayed:
        return
    _relayed.append((os.getpid(), parent))
    stops = (signal.SIGINT, *STOP_SIGNALS)
    for signum in stops:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, _stop_once)
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    threading.Thread(target=_relay, args=(read, parent, stops), daemon=True).start()


def _relay(read, parent, stops):
    """Re-send the first signal to the main thread, or SIGTERM once `parent` is gone (kill -9
    tells no one): a signal that lands on another thread (BLAS, tqdm) may wait for seconds."""
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    while not select.select([read], [], [], 0.5)[0]:
        if parent and os.getppid() != parent:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            return
    signal.pthread_kill(threading.main_thread().ident, os.read(read, 1)[0])


@contextlib.contextmanager
def signals_deferred():
    """Hold back the stop that a signal asks for while the block runs (writes that belong
    together); it comes as the block ends. Works whichever thread the signal landed on."""
    _deferred["depth"] += 1
    try:
        yield
    finally:
        _deferred["depth"] -= 1
        if not _deferred["depth"] and _deferred["pending"]:
            _deferred["pending"] = False
            raise Stopped(stop_signal)


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


# --- hostile input: text shown to the user, files opened for reading (issue 12) ---------------


def shown(text):
    """`text` (a str, bytes or path) safe to print: control and other non-printable characters
    escaped as `repr` writes them, ordinary Unicode kept. For names and paths read from files."""
    text = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    return text if text.isprintable() else "".join(
        c if c.isprintable() else repr(c)[1:-1] for c in text)


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
