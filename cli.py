"""What every script shares at its edge: one-line errors, exit codes, options, atomic writes.

A failure the user can act on raises `Error`; `run` prints it as a single
`error: ...` line on stderr and exits 1. Usage errors exit 2. `--debug` (or
the environment variable MLP_DEBUG=1) shows the full traceback instead.
"""
import argparse
import contextlib
import json
import os
import sys
import tempfile
import traceback


class Error(Exception):
    """A failure with a message the user can act on (bad file, bad value, no data)."""


class UsageError(Error):
    """A bad command-line value found after parsing: exits 2, as argparse's errors do."""


class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one `error:` line, exit status 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
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


def add_config_options(parser, defaults, helps, choices=None):
    """Add one `--key` option per configuration key, typed from its default value.

    Options default to None so that a caller can tell which keys the user set.
    """
    choices = choices or {}
    for key, default in defaults.items():
        flag = "--" + key.replace("_", "-")
        kwargs = dict(default=None, help=f"{helps[key]} (default: {default})",
                      choices=choices.get(key))
        if isinstance(default, bool):
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif isinstance(default, (list, tuple)):
            kwargs.update(type=type(default[0]), nargs="+")
        elif default is None:
            kwargs.update(type=str)
        else:
            kwargs.update(type=type(default))
        parser.add_argument(flag, **kwargs)
    # The defaults are shown in each help text already.
    parser.formatter_class = argparse.HelpFormatter


def overrides(args, defaults):
    """The configuration keys the user gave on the command line, as a dict."""
    return {key: getattr(args, key) for key in defaults if getattr(args, key) is not None}


def run(main, argv=None):
    """Call `main(argv)` and turn failures into the project's error lines and exit codes."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("MLP_DEBUG", "") not in ("", "0")
    try:
        code = main(argv)
    except Error as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"error: {one_line(exc)}\n")
        code = 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        code = 130
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


# --- hostile input: text shown to the user, files opened for reading (issue 12) ---------------
import errno  # noqa: E402  (kept in this block to ease merging)
import stat  # noqa: E402


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
