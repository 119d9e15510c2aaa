"""Resumable training: kill -9, SIGTERM and SIGHUP at any moment, then --resume, must end
bit-identical to the uninterrupted run; one run per folder; refused resumptions.

Every run here is a real `python train.py` process on a tiny synthetic CIFAR folder, with
one BLAS thread (the guarantee is for the same machine and the same thread count).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import checkpoint
import cli
import files
import train
from conftest import ROOT, make_cifar_dir, run_child

pytestmark = pytest.mark.timeout(240)

# Dropout, flips and shifts draw from the random state, so a resume must restore it exactly;
# whitening (a little of it, to stay quick) and flip averaging are the default recipe's.
RUN = ["--epochs", "8", "--hidden-size", "48", "24", "--val-size", "40", "--batch-size", "20",
       "--warmup-epochs", "1", "--translate", "1", "--dropout", "0.1", "--whiten", "16",
       "--flip-average", "true", "--no-progress"]

# Runs train.py, but SIGKILLs itself at its Nth fsync: inside an atomic write, after the
# temporary file is complete and before it replaces the old one (or just after a rename).
DIE_AT_FSYNC = """
import os, signal, sys
sys.path.insert(0, sys.argv.pop(1))
calls, real_fsync = [0], os.fsync
def fsync(fd):
    calls[0] += 1
    if calls[0] == int(os.environ["DIE_AT_FSYNC"]):
        os.kill(os.getpid(), signal.SIGKILL)
    real_fsync(fd)
os.fsync = fsync
import cli, train
cli.run(train.main)
"""


def environment(**extra):
    env = {k: v for k, v in os.environ.items() if k != "MLP_DEBUG"}
    return {**env, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", **extra}


def command(data_dir, save_dir, *extra):
    return [sys.executable, str(ROOT / "train.py"), *RUN, "--data-dir", str(data_dir),
            "--save-dir", str(save_dir), *map(str, extra)]


def run(data_dir, save_dir, *extra, **env):
    done = subprocess.run(command(data_dir, save_dir, *extra), capture_output=True, text=True,
                          env=environment(**env), timeout=120)
    return done.returncode, done.stdout, done.stderr


def start(data_dir, save_dir, *extra):
    return subprocess.Popen(command(data_dir, save_dir, *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment())


def wait_for_epoch(process, save_dir, timeout=60):
    deadline = time.monotonic() + timeout
    while not (Path(save_dir) / "history.json").exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)


def accuracy_line(out):
    return [line for line in out.splitlines() if line.startswith("Test accuracy:")]


def outcome(save_dir, out):
    """What must match the uninterrupted run: best.npy's arrays, the history without its
    timings, and the printed test accuracy."""
    net, meta = checkpoint.load_checkpoint(Path(save_dir) / "best.npy")
    history = json.loads((Path(save_dir) / "history.json").read_text())
    epochs = [{k: v for k, v in r.items() if k != "seconds"} for r in history["epochs"]]
    return ({**net.params, "mean": meta["mean"], "std": meta["std"]}, meta["epoch"], epochs,
            accuracy_line(out))


def assert_same(a, b):
    (arrays_a, *rest_a), (arrays_b, *rest_b) = a, b
    assert arrays_a.keys() == arrays_b.keys()
    for name in arrays_a:
        assert np.array_equal(arrays_a[name], arrays_b[name]), name
    assert rest_a == rest_b


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_cifar_dir(root, n_per_batch=40)  # 200 training images
    return root


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """The uninterrupted run that every interrupted one must end identical to."""
    save_dir = tmp_path_factory.mktemp("reference")
    code, out, err = run(data_dir, save_dir)
    assert code == 0, err
    return outcome(save_dir, out)


def finish(data_dir, save_dir):
    """--resume until the run completes (the state may be missing if it died very early)."""
    if not (save_dir / train.STATE_FILE).exists():
        code, _, err = run(data_dir, save_dir, "--resume")
        assert code == 1 and "nothing to resume" in err and len(err.splitlines()) == 1, err
        code, out, err = run(data_dir, save_dir)
    else:
        code, out, err = run(data_dir, save_dir, "--resume")
    assert code == 0, err
    return outcome(save_dir, out)


@pytest.mark.parametrize("seed", range(3))
def test_kill_9_at_random_moments_then_resume_is_bit_identical(data_dir, reference, tmp_path,
                                                               seed):
    rng = np.random.default_rng(seed)
    for attempt in range(2):  # killed twice: the second kill hits a resumed run
        process = start(data_dir, tmp_path, *(["--resume"] if attempt else []))
        wait_for_epoch(process, tmp_path)
        time.sleep(rng.uniform(0, 0.4))
        process.kill()
        process.communicate()
    assert_same(finish(data_dir, tmp_path), reference)


@pytest.mark.parametrize("at_fsync", [1, 2, 5, 8, 11, 17, 26])
def test_kill_9_inside_a_state_or_checkpoint_write_then_resume(data_dir, reference, tmp_path,
                                                               at_fsync):
    done = subprocess.run([sys.executable, "-c", DIE_AT_FSYNC, str(ROOT),
                           *command(data_dir, tmp_path)[2:]], capture_output=True, text=True,
                          env=environment(DIE_AT_FSYNC=str(at_fsync)), timeout=120)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert_same(finish(data_dir, tmp_path), reference)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []  # the resumed run, holding the folder, removed the dead temp files


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129),
                                         (signal.SIGINT, 130)])
def test_a_signal_stops_cleanly_and_says_how_to_resume(data_dir, reference, tmp_path, signum,
                                                       code):
    process = start(data_dir, tmp_path)
    wait_for_epoch(process, tmp_path)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    if process.returncode == 0:  # the run had already finished: nothing to check here
        pytest.skip("the run ended before the signal arrived")
    assert process.returncode == code, err
    lines = err.splitlines()
    assert len(lines) == 1 and "--resume" in lines[0] and str(tmp_path) in lines[0], err
    assert len(accuracy_line(out)) == 1 and (tmp_path / "curves.png").exists()
    assert_same(finish(data_dir, tmp_path), reference)


def test_a_finished_run_resumed_reports_its_result(data_dir, tmp_path):
    code, out, _ = run(data_dir, tmp_path)
    before = outcome(tmp_path, out)
    code, out, err = run(data_dir, tmp_path, "--resume")
    assert code == 0, err
    assert_same(outcome(tmp_path, out), before)
    assert "resuming" in out and "epoch   1" not in out  # no epoch was trained again
    # The state is a checkpoint too: test.py can score the last epoch's weights.
    net, meta = checkpoint.load_checkpoint(tmp_path / train.STATE_FILE)
    assert meta["run"]["epoch"] == 8 and net.hidden_size == (48, 24)


def test_resume_refuses_other_options_no_state_and_a_bad_state(data_dir, tmp_path):
    code, _, err = run(data_dir, tmp_path, "--resume")
    assert code == 1 and err.startswith("error: nothing to resume in") and err.count("\n") == 1
    assert run(data_dir, tmp_path)[0] == 0
    code, _, err = run(data_dir, tmp_path, "--resume", "--lr", "0.03", "--seed", "4")
    assert code == 2 and err.count("\n") == 1 and "--lr" in err and "--seed" in err, err
    assert "--epochs" not in err
    (tmp_path / train.STATE_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    code, _, err = run(data_dir, tmp_path, "--resume")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err


def test_a_busy_folder_is_refused_at_once_and_a_dead_holder_never_blocks(data_dir, tmp_path):
    first = start(data_dir, tmp_path, "--epochs", "10000")
    try:
        wait_for_epoch(first, tmp_path)
        code, out, err = run(data_dir, tmp_path)
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert str(tmp_path) in err and f"pid {first.pid}" in err
        epochs = len(json.loads((tmp_path / "history.json").read_text())["epochs"])
        time.sleep(0.5)
        assert first.poll() is None  # the first run is unaffected and still training
        assert len(json.loads((tmp_path / "history.json").read_text())["epochs"]) > epochs
    finally:
        first.kill()
        first.communicate()
    code, _, err = run(data_dir, tmp_path, "--epochs", "2")  # the dead run's lock is gone
    assert code == 0, err


@pytest.mark.parametrize("how", ["moved", "deleted"])
def test_a_run_whose_folder_goes_stops_and_a_new_run_there_is_alone(data_dir, tmp_path, how):
    """Issue 24, item 2: atomic_write made the folder again, so the run went on writing in the
    old path, beside a second run admitted there; both ended with exit 0 in the same files."""
    run_dir, moved = tmp_path / "run", tmp_path / "moved"
    first = start(data_dir, run_dir, "--epochs", "10000")
    try:
        while not (run_dir / train.STATE_FILE).exists():  # the first epoch's files
            assert first.poll() is None
            time.sleep(0.005)
        while run_dir.exists():  # the run may be writing in it meanwhile
            os.rename(run_dir, moved) if how == "moved" else shutil.rmtree(run_dir, True)
        _, err = first.communicate(timeout=30)
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == 1 and err.count("\n") == 1, err
    assert "was moved or deleted while this run held it" in err
    assert not run_dir.exists()  # nothing written in the old path
    if how == "moved":  # what was saved went with the folder, whole
        state = checkpoint.load_checkpoint(moved / train.STATE_FILE)[1]["run"]
        history = json.loads((moved / "history.json").read_text())["epochs"]
        assert history[:len(state["history"])] == state["history"]  # as after a kill -9
        assert len(history) - len(state["history"]) <= 1 and (moved / "best.npy").exists()
        assert not [p for p in moved.iterdir() if p.name.endswith(".tmp")]
    code, _, err = run(data_dir, run_dir, "--epochs", "2")
    assert code == 0, err


def test_a_lost_race_for_the_lock_names_the_holder(tmp_path):
    """Issue 24, item 13: a run refused just as another took the lock, before it wrote its
    pid, said `pid unknown`."""
    holder = subprocess.Popen([sys.executable, "-c", """
import fcntl, os, sys, time
with open(sys.argv[1], "ab") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("locked", flush=True)
    time.sleep(0.3)
    os.write(lock.fileno(), f"{os.getpid()}\\n".encode())
    time.sleep(30)
""", str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(cli.Error, match=f"in use by another run \\(pid {holder.pid}\\)"):
            with files.folder_lock(tmp_path):
                pass
    finally:
        holder.kill()
        holder.communicate()


def test_train_function_resumes_for_callers(tmp_path):
    from test_train import small_config, synthetic_data

    data = synthetic_data()
    whole = train.train(small_config(tmp_path / "a", dropout=0.1), data, progress=False,
                        evaluate_test=True)

    def stop_at_2(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    config = small_config(tmp_path / "b", dropout=0.1)
    part = train.train(config, data, on_epoch=stop_at_2, progress=False)
    assert part["stopped"] == "interrupted" and part["epochs_run"] == 2
    resumed = train.train(config, data, progress=False, evaluate_test=True, resume=True)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed["history"]) == strip(whole["history"])
    assert resumed["test_acc"] == whole["test_acc"] and resumed["stopped"] == "completed"


# --- found by an adversarial review -----------------------------------------------------------

DEFER = """
import os, signal, sys, threading, time
sys.path.insert(0, sys.argv[1])
import cli
cli.stop_on_signals()
threading.Thread(target=time.sleep, args=(5,), daemon=True).start()  # a thread to land on
finished = False
try:
    with cli.signals_deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1.0)
        finished = True
except cli.Stopped as exc:
    print("stopped after the block" if finished else "stopped inside the block", exc.signum)
"""


def test_a_signal_waits_for_the_end_of_a_deferred_block():
    done = subprocess.run([sys.executable, "-c", DEFER, str(ROOT)], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.split() == ["stopped", "after", "the", "block", str(int(signal.SIGTERM))]


def test_a_run_under_nohup_ignores_sighup(data_dir, tmp_path):
    process = subprocess.Popen(command(data_dir, tmp_path), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=environment(),
                               preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
    wait_for_epoch(process, tmp_path)
    process.send_signal(signal.SIGHUP)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    assert "epoch   8" in out


def test_a_signal_before_the_first_epoch_still_exits_128_plus_it(data_dir, tmp_path):
    process = start(data_dir, tmp_path, "--hidden-size", "2048", "2048", "--whiten", "0",
                    "--batch-size", "1")
    deadline = time.monotonic() + 60
    while not (tmp_path / ".lock").exists():  # the run holds its folder: data are loaded
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert len(err.splitlines()) == 1 and "stopped" in err and not (tmp_path / "best.npy").exists()


def test_a_lock_that_is_a_link_is_refused_and_its_target_untouched(data_dir, tmp_path):
    precious = tmp_path / "precious.txt"
    precious.write_text("precious")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").symlink_to(precious)
    code, out, err = run(data_dir, tmp_path / "run")
    assert code == 1 and out == "" and err.startswith("error: cannot use") and "lock" in err
    assert precious.read_text() == "precious"


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
    """The folder of a finished 2-epoch run, to copy and tamper with."""
    save_dir = tmp_path_factory.mktemp("finished")
    assert run(data_dir, save_dir, "--epochs", "2")[0] == 0
    return save_dir


RECORD = {"epoch": 2, "train_loss": 0.5, "train_acc": 0.5, "val_loss": 0.5, "val_acc": 0.5,
          "lr": 0.5, "tflop": 0.5, "seconds": 0.5}  # an epoch's record, as train.py writes it


@pytest.mark.parametrize("change,message", [
    ({"epoch": -3}, "do not add up"), ({"epoch": 99}, "do not add up"),
    ({"history": "x"}, "do not add up"), ({"best_acc": "x"}, "not a number"),
    ({"stopped": "\x1b[31mred"}, "do not add up"), ({"extra": 1}, "not just"),
    # issue 24, item 9: these passed, then crashed after training or wrote Infinity
    ({"history": [{}, {}]}, "the record of epoch 1"), ({"flops": 10**400}, "not finite"),
    ({"flops": float("inf")}, "not finite"), ({"best_epoch": 0}, "best epoch (0)"),
    ({"history": [{**RECORD, "epoch": 1}, {**RECORD, "val_loss": "x"}]}, "epoch 2"),
    ({"history": [{**RECORD, "epoch": 1}, {**RECORD, "tflop": float("nan")}]}, "epoch 2")])
def test_a_crafted_run_state_is_one_clear_error(data_dir, finished, tmp_path, change, message):
    """A finished state resumed just reports its result: a crafted one must be refused."""
    shutil.copytree(finished, tmp_path, dirs_exist_ok=True)
    state = tmp_path / train.STATE_FILE
    with np.load(state) as archive:
        arrays = {k: archive[k] for k in archive.files}
    meta = json.loads(str(arrays["meta"]))
    meta["run"].update(change)
    arrays["meta"] = np.array(json.dumps(meta))
    np.savez(state, **arrays)
    code, out, err = run(data_dir, tmp_path, "--epochs", "2", "--resume")
    assert code == 1 and err.count("\n") == 1 and "not a valid run state" in err, err
    assert message in err and "\x1b" not in out + err


def test_resume_on_other_data_is_refused(data_dir, tmp_path):
    other = tmp_path / "other"
    make_cifar_dir(other, n_per_batch=40, seed=7)
    assert run(data_dir, tmp_path / "run", "--epochs", "2")[0] == 0
    code, _, err = run(other, tmp_path / "run", "--epochs", "2", "--resume")
    assert code == 1 and "other data" in err and err.count("\n") == 1, err


def test_more_whitened_components_than_images_is_a_usage_error(data_dir, tmp_path):
    code, out, err = run(data_dir, tmp_path, "--whiten", "400")
    assert code == 2 and out == "" and "--whiten 400 is more than the 160" in err, err


def test_a_closed_terminal_stops_the_run_cleanly(data_dir, tmp_path):
    """SIGHUP from a terminal that went away: writes to it fail with EIO, yet the run
    draws its curves, keeps its state and exits 129."""
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: train.py on the terminal, stderr to a file
        err = os.open(tmp_path / "err.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(err, 2)
        os.environ.update(environment())
        os.execv(sys.executable, command(data_dir, tmp_path / "run", "--epochs", "10000"))
    seen, deadline = b"", time.monotonic() + 60
    while b"epoch   1 " not in seen and time.monotonic() < deadline:
        seen += os.read(fd, 1 << 16)
    os.close(fd)  # the terminal goes away: SIGHUP, then EIO on every write to it
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 129, (tmp_path / "err.txt").read_text()
    assert (tmp_path / "run" / "curves.png").exists()
    assert "--resume" in (tmp_path / "err.txt").read_text()


SAID = """
import errno, cli
def gone(message):
    raise OSError(errno.EIO, "Input/output error")
try:
    cli.said(gone)("epoch 1")
except cli.Stopped as exc:
    print(exc.signum, exc)
try:
    cli.said(lambda message: open("/nonexistent/x"))("epoch 1")
except FileNotFoundError:
    print("other errors pass")
"""


def test_a_write_to_a_terminal_gone_stops_as_its_sighup_would():
    """The race of the test above, made certain: the write fails before SIGHUP arrives."""
    result = run_child(SAID)
    assert result.stdout == f"{int(signal.SIGHUP)} stopped by SIGHUP\nother errors pass\n", \
        result.stderr


def test_a_lock_that_is_a_hard_link_is_refused_and_its_target_untouched(tmp_path):
    """Past the list: the pid was written over whatever file `.lock` was a hard link to."""
    precious = tmp_path / "precious.txt"
    precious.write_text("precious")
    (tmp_path / "run").mkdir()
    os.link(precious, tmp_path / "run" / ".lock")
    with pytest.raises(cli.Error, match="cannot use .*lock: it is a hard link"):
        with files.folder_lock(tmp_path / "run"):
            pass
    assert precious.read_text() == "precious"
