"""What every script shares at its edge: one-line errors, exit codes, options, signals.

A failure the user can act on raises `Error`; `run` prints it as a single
`error: ...` line on stderr and exits 1. Usage errors exit 2. `--debug` (or
the environment variable MLP_DEBUG=1) shows the full traceback instead.
"""
import argparse
import contextlib
import errno
import os
import select
import signal
import stat
import sys
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


def add_config_options(parser, defaults, helps, choices=None, aliases=None, shown=None):
    """Add one `--key` option per configuration key, typed from its default value.

    An option the user does not give is absent from the parsed arguments (see `overrides`),
    so presets can fill it; `aliases` maps other accepted names to keys, `shown` keys to the
    default their help states, where it is not `defaults`' value.
    """
    choices, aliases, shown = choices or {}, aliases or {}, shown or {}
    for key, default in defaults.items():
        flags = ["--" + name.replace("_", "-") for name in [key, *aliases_of(key, aliases)]]
        kwargs = dict(default=argparse.SUPPRESS, dest=key, choices=choices.get(key),
                      help=f"{helps[key]} (default: {shown.get(key, default)})")
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


def warn(message):
    """`message` as one `warning:` line on stderr, escaped as the error lines are."""
    sys.stderr.write(f"warning: {one_line(message)}\n")


def one_line(exc):
    """The message of `exc` on one line, however many lines it holds, escaped for the terminal
    (it may quote a file)."""
    return shown(" ".join(line.strip() for line in str(exc).splitlines() if line.strip()))



# --- signals --------------------- -----------------------------------------------------------

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that it stops as on Ctrl-C."""

    def __init__(self, signum, what=""):
        super().__init__(f"stopped by {signal.Signals(signum).name}" + (what and f" {what}"))
        self.signum = signum


@contextlib.contextmanager
def stopping_says(what):
    """Add `what` to the message of a stop by a signal inside the block: what was stopped and
    what is left, e.g. "while starting up: nothing was written"."""
    try:
        yield
    except Stopped as exc:
        raise Stopped(exc.signum, what) from None


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


def said(write):
    """`write`, except that a terminal gone away (its writes fail with EIO, maybe before its
    SIGHUP arrives) stops the program as that SIGHUP does."""
    def say(message):
        try:
            write(message)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            _stop_once(signal.SIGHUP, None)
    return say


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


# --- text from files, shown to the user -----------------------------------------------------


def shown(text):
    """`text` (a str, bytes or path) safe to print: control and other non-printable characters
    escaped as `repr` writes them, ordinary Unicode kept. For names and paths read from files."""
    text = os.fsdecode(text) if isinstance(text, (bytes, os.PathLike)) else str(text)
    return text if text.isprintable() else "".join(
        c if c.isprintable() else repr(c)[1:-1] for c in text)
