"""Reliability and security: nothing lost, nothing executed, every bad input answered clearly.

- kill -9 while checkpoints are written, at random moments and at chosen ones;
- read-only and full results folders (real ones when this runs as root and may mount a
  tmpfs; a simulated ENOSPC always);
- every script refusing bad option values before any work, with one `error:` line and
  exit status 2 (usage) or 1 (run time); --debug and MLP_DEBUG=1 show the traceback;
- fuzzing (hypothesis) of the checkpoint loader and the batch unpickler: only the project's
  own errors escape, and an audit hook and a marker file show that no code ran.

Related guarantees tested elsewhere: bad checkpoints (test_checkpoint.py), crafted pickles,
interrupted and corrupt downloads (test_cifar10.py), kill -9 and resume of a search
(test_tuning.py), unreadable --image files (test_evaluation.py).
"""
import codecs
import errno
import functools
import io
import json
import os
import pickle
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import benchmark
import cifar10
import cli
import data_loader
import hyperparam_tuning as ht
import model
import train
import utils
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from conftest import batch_bytes, load_script, make_cifar_dir

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
TMP_NAME = re.compile(r"^\..+\.tmp$")  # atomic_write's temporary files: hidden, never loaded
# Tiny training runs: 100 synthetic images, 20 held out, batches of 10, 8 hidden units.
TINY = ["--epochs", "2", "--hidden-size", "8", "--val-size", "20", "--batch-size", "10",
        "--warmup-epochs", "0", "--translate", "0", "--whiten", "0", "--flip-average", "false"]


evaluate = load_script("test")


def dead_url():
    """A URL on a local port where nothing listens: no download can leave the machine."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/cifar-10-python.tar.gz"


def environment(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MLP_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "CIFAR10_URL": dead_url(), **extra}


def script(name, *args, timeout=60, **env):
    """Run `python name.py args` as a user would: (exit status, stdout, stderr)."""
    done = subprocess.run([sys.executable, str(ROOT / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, env=environment(**env),
                          timeout=timeout, cwd=ROOT)
    return done.returncode, done.stdout, done.stderr


def in_process(main, argv, capsys):
    """Run a script's main through cli.run, as its command line does: (status, out, err)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_error_line(err, *words):
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert str(word) in lines[0], err


def snapshot(folder):
    """Every file under `folder` with its bytes, to show that nothing changed."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}  # a run's lock records its pid


@pytest.fixture(autouse=True)
def no_debug_no_network(monkeypatch):
    monkeypatch.delenv("MLP_DEBUG", raising=False)
    monkeypatch.setenv("CIFAR10_URL", dead_url())
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A synthetic CIFAR-10 folder: 100 training and 20 test images."""
    root = tmp_path_factory.mktemp("data")
    make_cifar_dir(root, n_per_batch=20)
    return root


# --- kill -9 while checkpoints are written ----------------------------------------------------

MEAN, STD = np.full(3072, 120, np.float32), np.full(3072, 60, np.float32)


@functools.lru_cache(maxsize=8)
def version(k):
    """Checkpoint number k: its own weights, and one of three sizes, so a mix-up shows."""
    return model.ThreeLayerNN(3072, (8, 32, 16)[k % 3], 10, "relu", seed=k)


def save_version(path, k):
    save_checkpoint(path, version(k), MEAN, STD, data_loader.CLASS_NAMES, {}, version=k)


def assert_is_version(path, allowed):
    """`path` loads, and is exactly one of the checkpoint versions in `allowed`."""
    net, meta = load_checkpoint(path)
    k = meta["version"]
    assert k in allowed, (k, allowed)
    for name, param in version(k).params.items():
        np.testing.assert_array_equal(getattr(net, name), param)
    np.testing.assert_array_equal(meta["mean"], MEAN)
    return k


def write_forever(path, first, out):
    """The writer: save versions first, first + 1, ... telling `out` where it is."""
    k = first
    while True:
        os.write(out, b"start %d\n" % k)
        save_version(path, k)
        os.write(out, b"done %d\n" % k)
        k += 1


def fork(target, *args):
    """Run target(*args, pipe) in a forked child; returns (pid, read end of the pipe)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        try:
            os.close(read)
            target(*args, write)
        except BaseException as exc:
            os.write(write, f"crash {exc!r}\n".encode())
        finally:
            os._exit(1)
    os.close(write)
    return pid, read


def kill(pid, read):
    """SIGKILL the child; return the lines it wrote."""
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    chunks = []
    while chunk := os.read(read, 1 << 16):
        chunks.append(chunk)
    os.close(read)
    lines = b"".join(chunks).decode().splitlines()
    assert not [line for line in lines if line.startswith("crash")], lines
    return lines


def wait_for(read, word, timeout=30):
    """Read the child's pipe until a line holds `word`."""
    seen, deadline = b"", time.monotonic() + timeout
    while word.encode() not in seen:
        ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
        assert ready, f"the child never said {word!r}: {seen!r}"
        chunk = os.read(read, 4096)
        assert chunk, f"the child stopped before {word!r}: {seen!r}"
        seen += chunk
    return seen


def test_kill_9_at_random_moments_of_checkpoint_writes(tmp_path):
    path = tmp_path / "best.npy"
    save_version(path, 0)
    current, rng = 0, np.random.default_rng(0)
    for _ in range(60):
        pid, read = fork(write_forever, path, current + 1)
        time.sleep(rng.uniform(0.001, 0.03))
        lines = kill(pid, read)
        started = [int(line.split()[1]) for line in lines if line.startswith("start")]
        # The file holds the version being written when the kill came, or the one before.
        allowed = {started[-1], started[-1] - 1} if started else {current}
        current = assert_is_version(path, allowed)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "best.npy"]
        assert all(TMP_NAME.match(name) for name in leftovers), leftovers
        for name in leftovers:  # the next kill's leftovers are counted afresh
            os.remove(tmp_path / name)
    assert current > 1  # the writers made progress, so the kills fell among writes


@pytest.mark.parametrize("point", ["synced", "renamed"])
def test_kill_9_at_the_critical_points_of_a_write(tmp_path, point):
    """Stop the writer inside atomic_write, just before the rename or just after it."""
    path = tmp_path / "best.npy"
    save_version(path, 0)

    def writer(out):
        real = os.fsync if point == "synced" else os.replace

        def stop(*args, **kwargs):
            if point == "renamed":
                real(*args, **kwargs)
            os.write(out, b"stopped\n")
            time.sleep(60)

        setattr(os, real.__name__, stop)  # only in this forked child
        save_version(path, 1)

    pid, read = fork(writer)
    wait_for(read, "stopped")
    kill(pid, read)
    assert assert_is_version(path, {0, 1}) == (0 if point == "synced" else 1)
    leftovers = [p for p in tmp_path.iterdir() if p.name != "best.npy"]
    assert len(leftovers) == (1 if point == "synced" else 0)
    if leftovers:  # the complete new version, not yet renamed: hidden, and never loaded
        assert TMP_NAME.match(leftovers[0].name)
        assert assert_is_version(leftovers[0], {1}) == 1


def test_a_run_starting_in_a_folder_leaves_a_live_writers_temporary_file(tmp_path, data_dir):
    """Issue 24, item 10: utils.py writes into a run folder without holding it, and a train.py
    starting there deleted utils.py's temporary file, which then failed. The sweep now takes
    only what no live writer holds; a killed writer's leftover still goes."""
    save_dir = tmp_path / "run"
    save_dir.mkdir()
    (save_dir / ".curves.png.deadbeef.tmp").write_bytes(b"left by a killed writer")
    writer = subprocess.Popen([sys.executable, "-c", """
import sys, files
with files.atomic_write(sys.argv[1]) as f:
    f.write(b"from the other writer")
    print("writing", flush=True)
    sys.stdin.readline()
""", str(save_dir / "curves.png")], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        [live] = [p for p in save_dir.iterdir() if p.name != ".curves.png.deadbeef.tmp"]
        assert train.main([*TINY, "--data-dir", str(data_dir), "--save-dir", str(save_dir),
                           "--no-progress"]) == 0
        assert live.exists() and not (save_dir / ".curves.png.deadbeef.tmp").exists()
        _, err = writer.communicate("\n", timeout=30)
    finally:
        writer.kill()
    assert writer.returncode == 0, err
    assert (save_dir / "curves.png").read_bytes() == b"from the other writer"


def test_kill_9_of_train_py_leaves_loadable_consistent_files(tmp_path, data_dir):
    rng = np.random.default_rng(1)
    for run in range(4):
        save_dir = tmp_path / f"run{run}"
        args = [sys.executable, str(ROOT / "train.py"), *TINY, "--epochs", "10000",
                "--data-dir", data_dir, "--save-dir", save_dir, "--no-progress", "--seed", run]
        process = subprocess.Popen(list(map(str, args)), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=environment())
        try:
            deadline = time.monotonic() + 60
            while not (save_dir / "history.json").exists():
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.3))
        finally:
            process.kill()
            process.wait()
        history = json.loads((save_dir / "history.json").read_text())["epochs"]
        net, meta = load_checkpoint(save_dir / "best.npy")
        # In an epoch best.npy is written before history.json: at most one epoch ahead.
        accs = [r["val_acc"] for r in history]
        assert 1 <= meta["epoch"] <= len(history) + 1
        if meta["epoch"] <= len(history):
            assert meta["val_acc"] == accs[meta["epoch"] - 1] == max(accs)
        else:
            assert meta["val_acc"] > max(accs)
        assert all(TMP_NAME.match(p.name) for p in save_dir.iterdir()
                   if p.name not in ("best.npy", "history.json", train.STATE_FILE, ".lock"))


# --- read-only and full results folders -------------------------------------------------------


def mount_tmpfs(point, size="1m"):
    """Mount a small tmpfs at `point`, or skip: it needs root and the right to mount."""
    point.mkdir(exist_ok=True)
    if not shutil.which("mount"):
        pytest.skip("no mount command")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def unmount(point):
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def train_tiny(save_dir, data_dir, capsys, *args):
    return in_process(train.main, [*TINY, "--data-dir", data_dir, "--save-dir", save_dir,
                                   "--no-progress", *args], capsys)


def takes_files(folder):
    try:
        (folder / "probe").write_bytes(b"")
    except PermissionError:
        return False
    (folder / "probe").unlink()
    return True


@pytest.fixture
def read_only_results(tmp_path, data_dir, capsys):
    """A results folder holding a finished run, which can no longer be written.

    chmod 0555 does it, unless we are root: then it is a copy on a tmpfs remounted
    read-only (skipped when mounting is not allowed).
    """
    results = tmp_path / "results"
    assert train_tiny(results, data_dir, capsys)[0] == 0
    results.chmod(0o555)
    try:
        if not takes_files(results):
            yield results
            return
    finally:
        results.chmod(0o755)
    read_only = tmp_path / "read_only"
    mount_tmpfs(read_only)
    try:
        shutil.copytree(results, read_only, dirs_exist_ok=True)
        done = subprocess.run(["mount", "-o", "remount,ro", str(read_only)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot remount read-only: {done.stderr.strip()}")
        yield read_only
    finally:
        unmount(read_only)


@pytest.mark.parametrize("name", ["train", "test", "utils", "hyperparam_tuning"])
def test_a_read_only_results_folder_is_one_clear_error(read_only_results, data_dir, capsys,
                                                      monkeypatch, name):
    before = snapshot(read_only_results)
    monkeypatch.setattr(ht, "catch_interrupts", lambda: None)
    checkpoint = read_only_results / "best.npy"
    argv, main = {
        "train": ([*TINY, "--data-dir", data_dir, "--save-dir", read_only_results], train.main),
        "test": (["--model", checkpoint, "--data-dir", data_dir, "--out-dir", read_only_results],
                 evaluate.main),
        "utils": (["--model", checkpoint, "--data-dir", data_dir], utils.main),
        "hyperparam_tuning": ([*TINY, "--space", "lr=0.05", "--data-dir", data_dir, "--out-dir",
                               read_only_results / "search"], ht.main),
    }[name]
    code, out, err = in_process(main, argv, capsys)
    assert code == 1
    assert out == ""  # refused before any training, evaluation or drawing
    assert_one_error_line(err, "cannot write", read_only_results)
    assert snapshot(read_only_results) == before


def test_a_full_disk_is_one_clear_error_and_keeps_the_previous_run(tmp_path, data_dir):
    disk = tmp_path / "disk"
    mount_tmpfs(disk, size="1m")
    try:
        results = disk / "results"
        code, _, err = script("train", *TINY, "--data-dir", data_dir, "--save-dir", results,
                              "--no-progress")
        assert code == 0, err
        before = snapshot(results)
        with open(disk / "filler", "wb", buffering=0) as f:  # fill the disk to the last byte
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
        code, out, err = script("train", *TINY, "--data-dir", data_dir, "--save-dir",
                                results, "--no-progress", "--seed", "1")
        assert code == 1
        assert_one_error_line(err, "cannot write", "No space left on device")
        assert snapshot(results) == before  # no half file, no temporary left
        load_checkpoint(results / "best.npy")
    finally:
        unmount(disk)


def test_a_failing_disk_write_keeps_the_previous_run(tmp_path, data_dir, capsys, monkeypatch):
    """ENOSPC simulated at fsync, for machines where no small file system can be mounted."""
    results = tmp_path / "results"
    assert train_tiny(results, data_dir, capsys)[0] == 0
    before = snapshot(results)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    code, _, err = train_tiny(results, data_dir, capsys, "--seed", "1")
    assert code == 1
    assert_one_error_line(err, "cannot write", results / "best.npy", "No space left")
    assert snapshot(results) == before


# --- bad input: refused before any work, one `error:` line, exit status 2 or 1 ----------------

TRAIN_BAD = [
    (["--lr", "0"], 2, "--lr must be positive"),
    (["--lr", "-1"], 2, "--lr must be positive"),
    (["--lr", "inf"], 2, "--lr must be a finite number"),
    (["--lr", "nan"], 2, "--lr"),
    (["--lr", "fast"], 2, "invalid float value"),
    (["--hidden-size", "0"], 2, "--hidden-size takes one or two positive ints"),
    (["--hidden-size", "1", "2", "3"], 2, "--hidden-size takes one or two positive ints"),
    (["--hidden-size", "-4"], 2, "--hidden-size"),
    (["--hidden-size"], 2, "expected at least one argument"),
    (["--activation", "nope"], 2, "invalid choice: 'nope'"),
    (["--epochs", "0"], 2, "--epochs must be in (0, 10000]"),
    (["--epochs", "10001"], 2, "--epochs must be in (0, 10000]"),
    (["--epochs", "1.5"], 2, "invalid int value"),
    (["--batch-size", "0"], 2, "--batch-size must be positive"),
    (["--momentum", "1"], 2, "--momentum must be in [0, 1)"),
    (["--momentum", "-0.1"], 2, "--momentum"),
    (["--dropout", "1"], 2, "--dropout must be in [0, 1)"),
    (["--reg", "-1"], 2, "--reg must be in [0, 1]"),
    (["--reg", "1e308"], 2, "--reg must be in [0, 1]"),
    (["--reg", "inf"], 2, "--reg must be a finite number"),
    (["--label-smoothing", "1"], 2, "--label-smoothing"),
    (["--lr-decay", "0"], 2, "--lr-decay"),
    (["--warmup-epochs", "-1"], 2, "--warmup-epochs"),
    (["--translate", "17"], 2, "--translate"),
    (["--seed", "-1"], 2, "--seed must be in [0, 4294967296)"),
    (["--flip", "maybe"], 2, "expected true or false"),
    (["--dtype", "float16"], 2, "invalid choice"),
    (["--preset", "nope"], 2, "invalid choice"),
    (["--val-size", "0"], 2, "--val-size must be positive"),
    (["--val-size", "-5"], 2, "--val-size must be positive"),
    (["--colour", "red"], 2, "unrecognized arguments"),
    # Checks that need the data: still usage errors (exit 2), before any training.
    (["--val-size", "100"], 2, "--val-size must be between 1 and 99"),
    (["--val-size", "1000"], 2, "--val-size must be between 1 and 99"),
    (["--batch-size", "81"], 2, "--batch-size 81 is larger than the 80 training images"),
    (["--data-dir", "{tmp}/nowhere"], 1, "no CIFAR-10 at"),
    (["--save-dir", "{tmp}/a_file"], 1, "cannot write to the folder"),
]


def without(argv, option):
    """`argv` less `option` and its value (a searched key must not also be fixed)."""
    if option not in argv:
        return argv
    i = argv.index(option)
    return argv[:i] + argv[i + 2:]


def fill(argv, tmp_path):
    return [a.replace("{tmp}", str(tmp_path)) for a in argv]


@pytest.mark.parametrize("args,status,message", TRAIN_BAD,
                         ids=[" ".join(a) for a, _, _ in TRAIN_BAD])
def test_train_refuses_bad_values_before_any_work(tmp_path, data_dir, capsys, args, status,
                                                  message):
    (tmp_path / "a_file").write_text("not a folder")
    save_dir = tmp_path / "results"
    # The progress bar is on: a bar drawn before the error would be a second stderr line.
    argv = [*TINY, "--data-dir", data_dir, "--save-dir", save_dir, *fill(args, tmp_path)]
    code, out, err = in_process(train.main, argv, capsys)
    assert code == status
    assert_one_error_line(err, message)
    assert out == "" and snapshot(save_dir) == {}


OTHER_BAD = [
    ("test", ["--batch-size", "0"], 2, "--batch-size must be positive"),
    ("test", ["--batch-size", "x"], 2, "invalid int value"),
    ("test", ["--model", "{tmp}/absent.npy"], 1, "no model at"),
    ("test", ["--model", "{tmp}/a_file"], 1, "is not a readable checkpoint"),
    ("test", ["--data-dir", "{tmp}/nowhere"], 1, "no CIFAR-10 at"),
    ("test", ["--out-dir", "{tmp}/a_file"], 1, "cannot write to the folder"),
    ("test", ["--image"], 2, "expected at least one argument"),
    ("utils", ["--batch-size", "-1"], 2, "--batch-size must be positive"),
    ("utils", ["--model", "{tmp}/absent.npy"], 1, "no model at"),
    ("utils", ["--out-dir", "{tmp}/a_file"], 1, "cannot write to the folder"),
    ("benchmark", ["--hidden-size", "0"], 2, "--hidden-size"),
    ("benchmark", ["--activation", "nope"], 2, "invalid choice: 'nope'"),
    ("benchmark", ["--batch-size", "0"], 2, "--batch-size must be positive"),
    ("benchmark", ["--epochs", "0"], 2, "--epochs must be positive"),
    ("benchmark", ["--n-images", "0"], 2, "--n-images must be at least --batch-size"),
    ("benchmark", ["--momentum", "1"], 2, "--momentum"),
    ("hyperparam_tuning", ["--lr", "0"], 2, "--lr must be positive"),
    ("hyperparam_tuning", ["--hidden-size", "0"], 2, "--hidden-size"),
    ("hyperparam_tuning", ["--activation", "nope"], 2, "invalid choice: 'nope'"),
    ("hyperparam_tuning", ["--space", "lr=0,0.1"], 2, "--lr must be positive"),
    ("hyperparam_tuning", ["--space", "dropout=0.5,1"], 2, "--dropout must be in [0, 1)"),
    ("hyperparam_tuning", ["--prune-startup", "-1"], 2, "must be >= 0"),
    ("hyperparam_tuning", ["--prune-warmup", "x"], 2, "expected an integer"),
    ("hyperparam_tuning", ["--n-trials", "0"], 2, "must be positive"),
    ("hyperparam_tuning", ["--timeout", "-1"], 2, "must be positive"),
    ("hyperparam_tuning", ["--space-file", "{tmp}/absent.json"], 2, "cannot read --space-file"),
    ("hyperparam_tuning", ["--val-size", "100"], 2, "--val-size must be between 1 and 99"),
    ("hyperparam_tuning", ["--space", "batch_size=10,81"], 2, "--batch-size 81 is larger"),
    ("hyperparam_tuning", ["--data-dir", "{tmp}/nowhere"], 1, "no CIFAR-10 at"),
    ("hyperparam_tuning", ["--out-dir", "{tmp}/a_file"], 1, "cannot write to the folder"),
]


def test_benchmark_measures_no_mixup_and_its_help_states_each_configurations_default(capsys):
    # Its PyTorch twin does no MixUp, and the report never used it.
    assert all(benchmark.measured_config(name, {})["mixup"] == 0 for name in benchmark.CONFIGS)
    with pytest.raises(SystemExit):
        benchmark.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: [512, 512] for report, [1024, 1024] for default)" in text
    assert "pixels (0 = off) (overrides both configurations) (default: 0 for report, 2 for " \
           "default)" in text


@pytest.mark.parametrize("name,args,status,message", OTHER_BAD,
                         ids=[f"{n} {' '.join(a)}" for n, a, _, _ in OTHER_BAD])
def test_other_scripts_refuse_bad_values_before_any_work(tmp_path, data_dir, capsys,
                                                         monkeypatch, name, args, status,
                                                         message):
    (tmp_path / "a_file").write_text("not a folder")
    out_dir = tmp_path / "out"
    checkpoint = tmp_path / "model" / "best.npy"
    save_checkpoint(checkpoint, model.ThreeLayerNN(3072, 8, 10), MEAN, STD,
                          data_loader.CLASS_NAMES, {})
    monkeypatch.setattr(ht, "catch_interrupts", lambda: None)  # keep pytest's Ctrl-C
    base, main = {
        "test": (["--model", checkpoint, "--data-dir", data_dir, "--out-dir", out_dir],
                 evaluate.main),
        "utils": (["--model", checkpoint, "--data-dir", data_dir, "--out-dir", out_dir],
                  utils.main),
        "benchmark": (["--hidden-size", "8", "--n-images", "20", "--batch-size", "10",
                       "--epochs", "1", "--no-torch", "--configs", "report"], benchmark.main),
        "hyperparam_tuning": ([*TINY, "--space", "seed=0", "--data-dir", data_dir,
                               "--out-dir", out_dir], ht.main),
    }[name]
    for item in args[args.index("--space") + 1:] if "--space" in args else []:
        base = without(base, "--" + item.split("=")[0].replace("_", "-"))
    code, out, err = in_process(main, [*base, *fill(args, tmp_path)], capsys)
    assert code == status
    assert_one_error_line(err, message)
    assert out == "" and snapshot(out_dir) == {}


def test_usage_and_run_time_errors_from_the_real_command_lines(tmp_path, data_dir):
    checkpoint = tmp_path / "best.npy"
    save_checkpoint(checkpoint, model.ThreeLayerNN(3072, 8, 10), MEAN, STD,
                          data_loader.CLASS_NAMES, {})
    cases = [
        ("train", ["--lr", "0"], 2),
        ("train", [*TINY, "--data-dir", tmp_path / "nowhere"], 1),
        ("hyperparam_tuning", ["--lr", "0", "--out-dir", tmp_path / "search"], 2),
        ("benchmark", ["--activation", "nope"], 2),
        ("test", ["--model", tmp_path / "absent.npy"], 1),
        ("utils", ["--model", checkpoint, "--batch-size", "0"], 2),
    ]
    for name, args, status in cases:
        code, out, err = script(name, *args)
        assert code == status, (name, args, err)
        assert_one_error_line(err)
        assert out == ""
    assert not (tmp_path / "search").exists()


@pytest.mark.parametrize("switch", ["--debug", "MLP_DEBUG=1"])
def test_debug_shows_the_traceback(tmp_path, switch):
    args = [*TINY, "--data-dir", tmp_path / "nowhere"]
    if switch.startswith("--"):
        code, _, err = script("train", *args, switch)
    else:
        code, _, err = script("train", *args, MLP_DEBUG="1")
    assert code == 1
    assert "Traceback (most recent call last)" in err and "DataError" in err
    assert err.splitlines()[-1].startswith("error: no CIFAR-10 at")


def test_unexpected_failures_are_one_line_too(capsys, monkeypatch):
    def main(argv):
        raise ValueError("first line\n  second line")

    code, _, err = in_process(main, [], capsys)
    assert code == 1
    assert_one_error_line(err, "ValueError: first line second line", "--debug")
    monkeypatch.setenv("MLP_DEBUG", "1")
    with pytest.raises(ValueError):  # the traceback, from Python itself
        cli.run(main, [])


def png_header(width, height):
    """A PNG that declares its size and holds (almost) no pixels."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                  0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("content,message", [
    (b"", "not a picture in one of the formats"),
    ("folder", "not a regular file but a folder"),
    ("checkpoint", "not a picture in one of the formats"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "not a picture in one of the formats"),
    (png_header(10_000, 10_000), "decompression bomb"),  # above PIL's warning limit
    (png_header(100_000, 100_000), "decompression bomb"),  # above its error limit
    (png_header(0, 0), "cannot"),
])
def test_files_that_are_not_images_are_one_clear_error(tmp_path, capsys, content, message):
    checkpoint = tmp_path / "best.npy"
    save_checkpoint(checkpoint, model.ThreeLayerNN(3072, 8, 10), MEAN, STD,
                          data_loader.CLASS_NAMES, {})
    path = tmp_path / "picture.png"
    if content == "folder":
        path.mkdir()
    elif content == "checkpoint":
        shutil.copy(checkpoint, path)
    else:
        path.write_bytes(content)
    code, out, err = in_process(evaluate.main, ["--model", checkpoint, "--image", path], capsys)
    assert code == 1 and out == ""
    assert_one_error_line(err, "cannot read image", path, message)


def test_an_image_past_the_pixel_limit_is_refused_without_a_warning(tmp_path):
    """In a real process, where PIL's DecompressionBombWarning would print two more lines."""
    checkpoint = tmp_path / "best.npy"
    save_checkpoint(checkpoint, model.ThreeLayerNN(3072, 8, 10), MEAN, STD,
                          data_loader.CLASS_NAMES, {})
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(10_000, 10_000))
    code, out, err = script("test", "--model", checkpoint, "--image", path)
    assert code == 1 and out == ""
    assert_one_error_line(err, "cannot read image", path, "decompression bomb")


# --- fuzzing: only the project's own errors, and no code runs ----------------------------------

FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MARKER_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / f"mlp-fuzz-{os.getpid()}"
MARKER = MARKER_DIR / "code-ran"
# Audit events that no loader may raise: running commands or code, loading libraries, or
# resolving a pickle global with the stock unpickler (ours refuses before that).
FORBIDDEN_EVENTS = {"os.system", "exec", "subprocess.Popen", "os.posix_spawn", "os.exec",
                    "os.spawn", "os.fork", "os.forkpty", "ctypes.dlopen", "pickle.find_class",
                    "os.remove", "os.rename", "shutil.rmtree", "socket.connect",
                    "urllib.Request", "builtins.input"}
_watch = {"on": False, "seen": []}


def _audit(event, args):
    if not _watch["on"]:
        return
    writes = event == "open" and (
        (isinstance(args[1], str) and any(c in args[1] for c in "wax+"))
        or (isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    if event in FORBIDDEN_EVENTS or writes:
        _watch["seen"].append((event, repr(args)[:200]))


sys.addaudithook(_audit)  # audit hooks cannot be removed: this one acts only under `guarded`
codecs.lookup("cp437")  # zipfile's codec for some names: imported (an `exec` event) up front


def guarded(load, path, errors):
    """load(path), allowing only `errors` to escape; returns the result or None.

    Fails if the load opened anything for writing, ran a command or code, created the
    marker file that every payload in the fuzzers aims at, or warned (a warning would be
    a second line on stderr).
    """
    _watch["on"], _watch["seen"] = True, []
    try:
        with warnings.catch_warnings(record=True) as warned:
            warnings.simplefilter("always")
            try:
                return load(path)
            except errors as exc:
                assert str(path) in str(exc), exc  # the message names the file
                return None
            finally:
                assert not warned, [str(w.message) for w in warned]
    finally:
        _watch["on"] = False
        assert not _watch["seen"], _watch["seen"]
        assert not MARKER.exists(), "a payload ran"


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    MARKER_DIR.mkdir(exist_ok=True)
    yield tmp_path_factory.mktemp("fuzz")
    shutil.rmtree(MARKER_DIR, ignore_errors=True)


def checked_load_checkpoint(path):
    """load_checkpoint, and on success the invariants every loaded network keeps."""
    net, meta = load_checkpoint(path)
    assert net.w1.shape[0] == len(meta["mean"]) == len(meta["std"])
    assert net.w3.shape[1] == len(meta["class_names"]) > 0
    assert all(np.isfinite(p).all() for p in net.params.values()) and (meta["std"] > 0).all()
    return net, meta


def checked_read_batch(path):
    data, labels = cifar10.read_batch(path)
    assert data.dtype == np.uint8 and data.shape[1] == 3072 and len(data) == len(labels)
    assert labels.dtype == np.int64 and 0 <= labels.min() and labels.max() < 10
    return data, labels


def small_checkpoint_arrays():
    """The arrays of a small valid checkpoint (12 inputs, 5 and 4 hidden units, 3 classes)."""
    buffer = io.BytesIO()
    net = model.ThreeLayerNN(12, (5, 4), 3, "tanh", seed=1)
    arrays = {**net.params, "mean": np.zeros(12, np.float32), "std": np.ones(12, np.float32),
              "meta": np.array(json.dumps({"activation": "tanh", "class_names": ["a", "b", "c"],
                                           "hidden_size": [5, 4], "config": {}}))}
    np.savez(buffer, **arrays)
    return arrays, buffer.getvalue()


VALID_ARRAYS, VALID_CHECKPOINT = small_checkpoint_arrays()


class RunsCode:
    """A pickle payload: loading it with plain pickle creates the marker file."""

    def __reduce__(self):
        return os.system, (f"touch '{MARKER}'",)


def npz_bytes(arrays, compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as z:
        for name, value in arrays.items():
            with z.open(name + ".npy", "w") as f:
                if isinstance(value, bytes):
                    f.write(value)  # a member given as raw .npy bytes
                else:
                    np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=True)
    return buffer.getvalue()


def npy_bytes(array):
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.asanyarray(array), allow_pickle=True)
    return buffer.getvalue()


def mutate(data, draw):
    """Flip, overwrite, delete or insert a few bytes, or truncate: mostly near the ends,
    where the headers and the structure are."""
    data = bytearray(data)
    n = len(data)
    position = st.one_of(st.integers(0, min(n, 256)), st.integers(max(0, n - 256), n),
                         st.integers(0, n))
    for _ in range(draw(st.integers(1, 4))):
        at = min(draw(position), len(data))
        kind = draw(st.sampled_from(["flip", "set", "delete", "insert", "truncate"]))
        if kind == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del data[at:]
    return bytes(data)


def finite_json():
    return st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8)
                        | st.floats(allow_nan=False, allow_infinity=False),
                        lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                        max_leaves=8)


@st.composite
def damaged_arrays(draw):
    """A valid checkpoint's arrays with a few of them dropped, swapped or replaced."""
    arrays = dict(VALID_ARRAYS)
    names = sorted(arrays)
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["drop", "swap", "dtype", "object", "nan", "shape",
                                     "meta", "extra", "scalar", "bigendian"]))
        value = arrays.get(name, np.zeros(3, np.float32))
        if kind == "drop":
            arrays.pop(name, None)
        elif kind == "swap":
            other = draw(st.sampled_from(names))
            arrays[name], arrays[other] = arrays.get(other), value
        elif kind == "dtype":
            dtype = draw(st.sampled_from(["f2", "f8", "i4", "u1", "c8", "?", "U3", "S3", "V4"]))
            arrays[name] = np.zeros(np.shape(value), dtype)
        elif kind == "object":
            arrays[name] = np.array([RunsCode(), {"a": 1}, None], dtype=object)
        elif kind == "nan":
            numeric = np.asarray(value).dtype.kind in "fiub"
            value = np.array(value, np.float32) if numeric else np.zeros(3, np.float32)
            value.flat[draw(st.integers(0, max(value.size - 1, 0)))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -1.0]))
            arrays[name] = value
        elif kind == "shape":
            shape = tuple(draw(st.lists(st.integers(0, 13), max_size=3)))
            arrays[name] = np.zeros(shape, np.float32)
        elif kind == "meta":
            arrays["meta"] = np.array(json.dumps(draw(finite_json())))
        elif kind == "extra":
            arrays[draw(st.text("abcxyz_", min_size=1, max_size=5))] = value
        elif kind == "scalar":
            arrays[name] = np.float32(draw(st.floats(width=32)))
        elif kind == "bigendian":
            arrays[name] = np.asarray(value).astype(np.asarray(value).dtype.newbyteorder(">"))
    return {k: v for k, v in arrays.items() if v is not None}


def write(folder, name, data):
    path = folder / name
    path.write_bytes(data)
    return path


@FUZZ
@given(data=st.binary(max_size=4096), prefix=st.sampled_from(
    [b"", b"PK\x03\x04", b"PK\x05\x06", b"\x93NUMPY\x01\x00", b"\x93NUMPY\x03\x00"]))
def test_fuzz_checkpoint_loader_random_bytes(fuzz_dir, data, prefix):
    path = write(fuzz_dir, "random.npy", prefix + data)
    assert guarded(load_checkpoint, path, CheckpointError) is None


@FUZZ
@given(st.data())
def test_fuzz_checkpoint_loader_mutated_file(fuzz_dir, data):
    path = write(fuzz_dir, "mutated.npy", mutate(VALID_CHECKPOINT, data.draw))
    guarded(checked_load_checkpoint, path, CheckpointError)


@FUZZ
@given(st.data())
def test_fuzz_checkpoint_loader_mutated_member(fuzz_dir, data):
    """Mutate one array's .npy bytes (its header, most often) and zip it again with a
    correct checksum, so that the mutation reaches NumPy's parser and our checks."""
    members = {name: npy_bytes(value) for name, value in VALID_ARRAYS.items()}
    name = data.draw(st.sampled_from(sorted(members)))
    members[name] = mutate(members[name], data.draw)
    path = write(fuzz_dir, "member.npy", npz_bytes(members))
    guarded(checked_load_checkpoint, path, CheckpointError)


@FUZZ
@given(damaged_arrays(), st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]))
def test_fuzz_checkpoint_loader_damaged_arrays(fuzz_dir, arrays, compression):
    path = write(fuzz_dir, "damaged.npy", npz_bytes(arrays, compression))
    guarded(checked_load_checkpoint, path, CheckpointError)


def test_checkpoint_loader_never_unpickles(fuzz_dir):
    """An object array whose pickle would run a command: refused, and nothing runs."""
    arrays = {**VALID_ARRAYS, "w1": np.array([RunsCode()], dtype=object)}
    for data in (npz_bytes(arrays), npy_bytes(np.array([RunsCode()], dtype=object))):
        path = write(fuzz_dir, "pickled.npy", data)
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            guarded(load_checkpoint, path, ())
    pickle.loads(pickle.dumps(RunsCode()))  # the payload is live: plain pickle runs it
    assert MARKER.exists()
    MARKER.unlink()


# Pickle programs assembled from opcodes: calls of globals, dangerous and allowed alike.
GLOBALS = [("os", "system"), ("posix", "system"), ("builtins", "exec"), ("builtins", "eval"),
           ("builtins", "open"), ("builtins", "getattr"), ("builtins", "__import__"),
           ("subprocess", "call"), ("pathlib", "Path"), ("copyreg", "_reconstructor"),
           ("numpy", "load"), ("numpy.lib.format", "read_array"), ("pickle", "loads"),
           ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
           ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"), ("nt", "system")]
STRINGS = [f"touch '{MARKER}'", f"open({str(MARKER)!r}, 'w')",
           f"__import__('os').system(\"touch '{MARKER}'\")", str(MARKER), "w", "system", "os",
           "latin1", "utf8", "data", "labels", "u1", "O", "<f4", "b", "touch"]
BYTES = [b"", b"b", b"u1", b"O", b"data", b"labels", b"\x00" * 3072, b"\x01\x02\x03"]
INTS = [0, 1, 2, 3, -1, 9, 10, 255, 3072, 2**62]
OPS = [b"(", b"t", b"\x85", b"\x86", b"\x87", b"]", b"}", b")", b"a", b"e", b"s", b"u",
       b"R", b"b", b"\x81", b"o", b"0", b"2", b"N", b"\x88", b"\x94", b"h\x00", b"q\x00",
       b"\x82\x01", b"Q", b"\x93"]


def op_string(text):
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def op_int(value):
    if 0 <= value < 256:
        return b"K" + bytes([value])
    raw = value.to_bytes(9, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def op_global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def op_call(module, name, args):
    return op_global(module, name) + b"(" + b"".join(args) + b"tR"


scalars = st.one_of(st.sampled_from(STRINGS).map(op_string), st.sampled_from(INTS).map(op_int),
                    st.sampled_from(BYTES).map(lambda b: b"B" + struct.pack("<I", len(b)) + b))
tokens = st.one_of(
    scalars, st.sampled_from(OPS),
    st.sampled_from(GLOBALS).map(lambda g: op_global(*g)),
    st.builds(lambda g, args: op_call(*g, args), st.sampled_from(GLOBALS),
              st.lists(scalars, max_size=3)),
    st.builds(lambda g, args: b"(" + b"".join(args) + b"i" + f"{g[0]}\n{g[1]}\n".encode(),
              st.sampled_from(GLOBALS), st.lists(scalars, max_size=2)),
    st.builds(lambda g: op_string(g[0]) + op_string(g[1]) + b"\x93",
              st.sampled_from(GLOBALS)),
)


@FUZZ
@given(protocol=st.integers(2, 5), program=st.lists(tokens, min_size=1, max_size=25),
       wrap=st.booleans())
def test_fuzz_batch_unpickler_opcode_programs(fuzz_dir, protocol, program, wrap):
    body = b"".join(program)
    if wrap:  # as the value of b'data' in a dict, where a batch's array would be
        body = b"}" + op_string("data") + body + b"s"
    path = write(fuzz_dir, "program", b"\x80" + bytes([protocol]) + body + b".")
    guarded(checked_read_batch, path, data_loader.DataError)


@FUZZ
@given(st.binary(max_size=4096))
def test_fuzz_batch_unpickler_random_bytes(fuzz_dir, data):
    path = write(fuzz_dir, "random_batch", data)
    assert guarded(cifar10.read_batch, path, data_loader.DataError) is None


VALID_BATCHES = [batch_bytes(np.arange(2 * 3072).reshape(2, 3072).astype(np.uint8), [3, 7],
                             **style)
                 for style in (dict(keys="bytes", legacy=True, protocol=3),
                               dict(keys="bytes", legacy=False, protocol=2),
                               dict(keys="str", legacy=False, protocol=4, numpy_labels=True))]


@FUZZ
@given(st.data())
def test_fuzz_batch_unpickler_mutated_batches(fuzz_dir, data):
    valid = data.draw(st.sampled_from(VALID_BATCHES))
    mutated = mutate(valid, data.draw)
    if data.draw(st.booleans()):  # splice a call into the stream
        at = data.draw(st.integers(0, len(mutated)))
        call = op_call(*data.draw(st.sampled_from(GLOBALS)), [op_string(STRINGS[0])])
        mutated = mutated[:at] + call + mutated[at:]
    path = write(fuzz_dir, "mutated_batch", mutated)
    guarded(checked_read_batch, path, data_loader.DataError)


def test_the_fuzzers_payloads_are_live(fuzz_dir):
    """Control: the stock unpickler runs the same programs, so the fuzzers can fail."""
    program = b"\x80\x02" + op_call("os", "system", [op_string(STRINGS[0])]) + b"."
    path = write(fuzz_dir, "control", program)
    with pytest.raises(data_loader.DataError, match="posix.system|os.system"):
        guarded(cifar10.read_batch, path, ())
    pickle.loads(program)
    assert MARKER.exists()
    MARKER.unlink()
