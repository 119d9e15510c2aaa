"""hyperparam_tuning.py: the checks before any work, grid coverage, resume after a kill,
pruning, failures, and one study shared by processes through a real PostgreSQL server, on tiny
synthetic data."""
import contextlib
import errno
import fcntl
import glob
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import numpy as np
import optuna
import pytest

import checkpoint
import cli
import config as cfg
import files
import hyperparam_tuning as ht
import search_report
import search_space
import study_storage
import utils
from conftest import CLASS_NAMES, FOLDER, TRAIN_FILES, batch_bytes, measured

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "hyperparam_tuning.py")
# Tiny, fast trials: 250 training and 50 validation images, a few epochs.
TINY = ["--val-size", "50", "--batch-size", "50", "--preset", "fast", "--whiten", "0"]


def tiny(args):
    """TINY, with 2 epochs unless the arguments set or search the epochs."""
    sets_epochs = any(a == "--epochs" or str(a).startswith("epochs=") for a in args)
    return [*TINY, *([] if sets_epochs else ["--epochs", "2"])]


def write_learnable_cifar(root, n_per_batch=60, seed=0):
    """A cifar-10-batches-py folder whose class sets a colour pattern: learnable in an epoch."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(40, 216, size=(10, 3072))
    folder = os.path.join(root, FOLDER)
    os.makedirs(folder, exist_ok=True)
    for name in TRAIN_FILES + ["test_batch"]:
        labels = rng.permutation(np.arange(n_per_batch) % 10)
        noise = rng.integers(-60, 61, size=(n_per_batch, 3072))
        images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(batch_bytes(images, labels, label=name))
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASS_NAMES]}, f, protocol=2)
    return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_learnable_cifar(tmp_path_factory.mktemp("data"))


def search(out_dir, data_dir, *args, monkeypatch=None):
    """Run the search in this process (one worker); returns main's exit status."""
    if monkeypatch:
        monkeypatch.setattr(ht, "catch_interrupts", lambda: None)  # keep pytest's Ctrl-C
    return ht.main([*args, *tiny(args), "--data-dir", data_dir, "--out-dir", str(out_dir)])


def command(out_dir, data_dir, *args):
    return [sys.executable, SCRIPT, *args, *tiny(args), "--data-dir", data_dir,
            "--out-dir", str(out_dir)]


def environment():
    return {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def run(out_dir, data_dir, *args, timeout=120):
    """Run the search as a command; fail the test on a non-zero exit."""
    done = subprocess.run(command(out_dir, data_dir, *args), capture_output=True, text=True,
                          env=environment(), timeout=timeout)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def load_trials(storage, name="search"):
    if "://" not in storage:
        storage = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(storage))
    return optuna.load_study(study_name=name, storage=storage).get_trials()


def combinations(space_items):
    return [tuple(sorted(c.items())) for c in search_space.grid(search_space.parse_space(space_items))]


def assert_grid_once(trials, space_items):
    """Every combination has exactly one complete trial, and nothing else completed."""
    complete = [tuple(sorted(t.params.items())) for t in trials
                if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(complete) == sorted(combinations(space_items))


# --- the search space and the checks before any work ------------------------------------------


def test_default_space_is_a_small_grid_close_to_the_report():
    plan = ht.make_plan(ht.build_parser().parse_args([]))
    assert list(plan["space"]) == ["lr", "hidden_size", "reg", "activation"]
    assert len(search_space.grid(plan["space"])) == 16 and plan["n_trials"] is None
    step = ht.make_plan(ht.build_parser().parse_args(["--lr-schedule", "step"]))
    assert "lr_decay" in step["space"] and len(search_space.grid(step["space"])) == 32
    fixed = ht.make_plan(ht.build_parser().parse_args(["--activation", "tanh"]))
    assert "activation" not in fixed["space"] and fixed["base"]["activation"] == "tanh"


@pytest.mark.parametrize("args,message", [
    (["--space", "colour=1,2"], "cannot search 'colour'"),
    (["--space", "lr=fast"], "cannot read 'fast' as float"),
    (["--space", "lr=1e-3:1e-1:log"], "grid needs lists"),
    (["--space", "lr=0.01,0.02", "--lr", "0.05"], "fixed and also searched"),
    (["--space", "activation=relu,swish"], "unknown activation"),
    (["--space", "reg=-1,0.1"], r"--reg must be in \[0, 1\]"),
    (["--sampler", "tpe", "--space", "lr=0:1:log"], "lo > 0 for log"),
    (["--space", "lr=0.1,0.1"], "repeats a value"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, data_dir, args, message):
    with pytest.raises(cli.Error, match=message):
        search(tmp_path / "out", data_dir, *args)
    assert not (tmp_path / "out").exists()


def test_help_shows_the_defaults_that_trials_start_from():
    text = " ".join(ht.build_parser().format_help().split())
    trial = cfg.make_config(ht.DEFAULT_PRESET)
    assert "--epochs EPOCHS passes over the training split (default: 9)" in text
    assert f"two ints (default: {trial['hidden_size']})" in text
    assert "(default: 100)" not in text and "(default: [1024, 1024])" not in text
    assert "KEY is any training option above" in text  # the epilog comes last
    assert "(16 trials of --preset fast, each 9 epochs, up to 2 min on 2 cores)" in text


def test_a_signal_while_the_data_is_read_says_that_nothing_was_written(tmp_path, data_dir,
                                                                       capsys, monkeypatch):
    def stopped(*args, **kwargs):
        raise cli.Stopped(signal.SIGTERM)

    monkeypatch.setattr(ht.data_loader, "load_data", stopped)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(lambda argv: search(tmp_path / "out", data_dir), [])
    assert exit_info.value.code == 143
    assert capsys.readouterr().err == ("error: stopped by SIGTERM while reading the data, "
                                       "before any trial: nothing was written; run the same "
                                       "command again\n")


@pytest.mark.parametrize("schedule", ["onecycle", "step"])
def test_best_result_lists_lr_decay_only_where_it_acts(tmp_path, schedule):
    study = optuna.create_study(direction="maximize")
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={
        "config": cfg.make_config(lr_schedule=schedule)}))
    plan = {"out_dir": str(tmp_path), "study_name": "s", "sampler": "grid"}
    best = search_report.write_best(study.best_trial, plan)
    assert ("lr_decay" in best["best_params"]) == (schedule == "step")
    assert json.loads((tmp_path / "best_result.json").read_text())["best_params"] == \
        best["best_params"]


def test_usage_errors_exit_2(tmp_path, data_dir, capsys):
    bad_values = (["--workers", "0"], ["--workers", str(ht.MAX_WORKERS + 1)],
                  ["--sampler", "bayes"], ["--study-name", "a/b"], ["--sampler-seed", "-1"],
                  ["--sampler-seed", str(2**32)])
    for bad in bad_values:
        with pytest.raises(SystemExit) as exit_info:
            search(tmp_path / "out", data_dir, *bad)
        assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("error:") == len(bad_values)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("storage,message", [
    ("sqlite:///{tmp}/study.db", "not sqlite://"),
    ("mysql://user@host/db", "not mysql://"),
    ("/dev/null", "/dev/null is not a regular file"),
    ("{tmp}", "is not a regular file"),
])
def test_only_a_journal_file_or_postgresql_is_accepted(tmp_path, data_dir, storage, message):
    before = set(os.listdir(tmp_path)), set(os.listdir("/dev"))
    with pytest.raises(cli.UsageError, match=message):
        search(tmp_path / "out", data_dir, "--storage", storage.format(tmp=tmp_path))
    assert (set(os.listdir(tmp_path)), set(os.listdir("/dev"))) == before  # no .claim, .lock


@pytest.mark.parametrize("password", ["secret", "se/cret", "s:e/c?r#et"])
def test_a_storage_password_is_never_shown(password):
    """where() names the storage in messages and trials.json; SQLAlchemy takes a password up
    to the first '@', also one with '/' in it."""
    import sqlalchemy
    url = f"postgresql+psycopg2://user:{password}@host:5432/db"
    assert sqlalchemy.engine.make_url(url).password == password
    assert study_storage.where(url) == "postgresql+psycopg2://user:***@host:5432/db"


@pytest.mark.parametrize("content,message", [
    (b'{"lr": [0.01, 0.05], "activation": "r\xe9lu"}', "is not UTF-8 text"),
    (b'{"lr": ' + b"[" * 100000 + b"]" * 100000 + b"}", "is nested too deeply"),
], ids=["not-utf8", "nested"])
def test_a_bad_space_file_is_one_clear_error(tmp_path, data_dir, content, message):
    (tmp_path / "space.json").write_bytes(content)
    with pytest.raises(cli.UsageError, match=message):
        search(tmp_path / "out", data_dir, "--space-file", str(tmp_path / "space.json"))


def test_a_fifo_as_space_file_is_refused_not_waited_on(tmp_path, data_dir):
    os.mkfifo(tmp_path / "space.json")
    with pytest.raises(cli.UsageError, match="cannot read --space-file .*not a regular file"):
        search(tmp_path / "out", data_dir, "--space-file", str(tmp_path / "space.json"))


# --- whole searches ---------------------------------------------------------------------------


def test_grid_runs_each_combination_once_and_writes_everything(tmp_path, data_dir, capsys,
                                                              monkeypatch):
    items = ["lr=0.05,0.02", "hidden_size=8,16"]
    out = tmp_path / "out"
    assert search(out, data_dir, "--space", *items, monkeypatch=monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "4 to run" in printed and "rank" in printed and "test.py --model" in printed
    trials = load_trials(str(out / "study.journal"))
    assert len(trials) == 4
    assert_grid_once(trials, items)

    table = json.loads((out / "trials.json").read_text())["trials"]
    assert {r["state"] for r in table} == {"COMPLETE"} and all(r["epochs_run"] == 2 for r in table)
    assert all(r["final_train_loss"] > 0 and r["seconds"] > 0 for r in table)
    csv_lines = (out / "trials.csv").read_text().splitlines()
    assert csv_lines[0].startswith("number,state,best_val_acc") and len(csv_lines) == 5

    best = json.loads((out / "best_result.json").read_text())
    assert set(best["best_params"]) == {"learning_rate", "hidden_size", "reg_lambda",
                                        "activation"}  # no lr_decay: it acts only in step
    assert best["best_val_acc"] == max(t.value for t in trials) > 0.5
    assert (out / "best.npy").read_bytes() == open(best["trial_checkpoint"], "rb").read()
    net, meta = checkpoint.load_checkpoint(str(out / "best.npy"))
    assert meta["config"]["lr"] == best["best_params"]["learning_rate"]
    for name in ("optimization_history.png", "param_importance.png",
                 "val_acc_lr_hidden_size.png"):  # what varied; reg was not searched
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "val_acc_lr_reg.png").exists()

    # Rerunning the same command finds nothing to do and changes nothing.
    assert search(out, data_dir, "--space", *items, monkeypatch=monkeypatch) == 0
    assert "0 to run" in capsys.readouterr().out
    assert [t.datetime_complete for t in load_trials(str(out / "study.journal"))] == \
        [t.datetime_complete for t in trials]


def test_one_searched_parameter_draws_no_importance_and_says_why(tmp_path, data_dir, capsys,
                                                                 monkeypatch):
    """A lone parameter's importance is 1 by definition: its plot was a single bar at 1.00."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "param_importance.png").write_bytes(b"from an earlier state")
    assert search(out, data_dir, "--space", "lr=0.05,0.02", monkeypatch=monkeypatch) == 0
    printed = capsys.readouterr().out
    assert "(parameter importance not drawn: only lr varies" in printed
    saved = next(line for line in printed.splitlines() if line.startswith("Saved in"))
    assert "val_acc_lr.png" in saved and "param_importance.png" not in saved
    assert not (out / "param_importance.png").exists() and (out / "val_acc_lr.png").exists()


def test_search_plots_say_what_they_show_and_number_trials_in_whole_numbers(tmp_path,
                                                                            monkeypatch):
    """Optuna's own plots were titled "Slice Plot", numbered trials 0.0, 0.2, ... on the
    colour bar, drew trial 0 white on grey and squeezed the plot beside its legend."""
    drawn = {}
    monkeypatch.setattr(utils, "save_figure",
                        lambda fig, path: drawn.setdefault(os.path.basename(path), fig))
    space = search_space.parse_space(["lr=0.01,0.05", "reg=1e-4:1e-2:log", "activation=relu"])
    study = optuna.create_study(direction="maximize")
    for lr, reg, acc in [(0.01, 1e-3, 0.3), (0.05, 1e-4, 0.4), (0.05, 1e-2, 0.35)]:
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr, "reg": reg, "activation": "relu"}, value=acc,
            distributions=search_space.distributions(space)))
    pair, _ = utils.plot_search(study, str(tmp_path), space, search_report.FILES)
    assert pair in ("val_acc_lr_reg.png", "val_acc_reg_lr.png")
    slices = drawn[pair]
    assert "validation accuracy against" in slices.get_suptitle()
    *panels, colour_bar = slices.axes
    assert sorted(ax.get_xlabel() for ax in panels) == ["lr", "reg"]
    low, high = colour_bar.get_ylim()
    assert [t for t in colour_bar.get_yticks() if low <= t <= high] == [0, 1, 2]
    first = panels[0].collections[0].get_facecolors()[0]
    assert first[:3].sum() < 2.5  # trial 0 is not (nearly) white
    history = drawn[search_report.FILES["history"]]
    assert "best 0.4000, trial 1" in history.axes[0].get_title()
    for fig in drawn.values():  # this project's look, not Optuna's grey ggplot style
        assert all(ax.get_facecolor()[:3] == (1.0, 1.0, 1.0) for ax in fig.axes)


def test_a_rerun_with_other_options_is_refused(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "out"
    search(out, data_dir, "--space", "lr=0.05", monkeypatch=monkeypatch)
    with pytest.raises(cli.Error, match="different search.*hidden_size"):
        search(out, data_dir, "--space", "lr=0.05", "--hidden-size", "9",
               monkeypatch=monkeypatch)


def test_grid_with_two_workers_runs_each_combination_once(tmp_path, data_dir):
    items = ["lr=0.05,0.02,0.01", "hidden_size=8,16"]
    printed = run(tmp_path / "out", data_dir, "--space", *items, "--workers", "2")
    assert "2 worker(s) with 1 BLAS thread(s) each" in printed
    trials = load_trials(str(tmp_path / "out" / "study.journal"))
    assert len(trials) == 6
    assert_grid_once(trials, items)


def test_a_killed_search_resumes_and_its_cut_trials_continue(tmp_path, data_dir):
    items = ["lr=0.05,0.02", "hidden_size=8,16"]
    out, journal = tmp_path / "out", str(tmp_path / "out" / "study.journal")
    slow = ["--space", *items, "--workers", "2", "--epochs", "20"]

    def a_cut_trial_has_epochs_saved():
        return any((out / f"trial_{t.number}" / ht.train.STATE_FILE).exists()
                   for t in running_trials(journal))

    first = start(out, data_dir, *slow, log=tmp_path / "first.log")
    try:
        wait_for(lambda: any(t.state.is_finished() for t in trials_now(journal))
                 and a_cut_trial_has_epochs_saved(), "a finished trial and a cut one")
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the parent and its workers, mid-search
        first.wait()

    before = {t.number: t for t in load_trials(journal)
              if t.state == optuna.trial.TrialState.COMPLETE}
    assert 1 <= len(before) < 4
    printed = run(out, data_dir, *slow)
    trials = load_trials(journal)
    assert_grid_once(trials, items)
    for t in trials:  # earlier results are kept as they were
        if t.number in before:
            assert t.state == before[t.number].state and t.value == before[t.number].value
    ran_now = [line for line in printed.splitlines() if line.startswith("trial ")]
    assert len(ran_now) == 4 - len(before), printed
    # Trials cut by the kill are failed as interrupted, and run again under a new number in
    # their own folder, from their last completed epoch.
    cut = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert cut and all(ht.interrupted(t) for t in cut) and len(trials) == 4 + len(cut)
    retries = [t for t in trials if "retry_of" in t.user_attrs]
    assert sorted(t.user_attrs["folder"] for t in retries) == sorted(t.number for t in cut)
    assert re.search(r"20 epoch\(s\) \(1?\d now\)", printed), printed  # fewer than 20


def test_pruning_stops_hopeless_trials(tmp_path, data_dir, monkeypatch):
    # Good trials first (the grid runs in the order given), then ones that cannot learn. The
    # good ones are all start-up trials, which are never pruned: on a tiny fixture one of
    # them may dip below its peers' median at some epoch, and that is not what this tests.
    items = ["lr=0.05,1e-6", "seed=0,1,2"]
    out = tmp_path / "out"
    search(out, data_dir, "--space", *items, "--epochs", "3", "--pruner", "median",
           "--prune-startup", "3", monkeypatch=monkeypatch)
    trials = load_trials(str(out / "study.journal"))
    pruned = [t for t in trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.params["lr"] == 1e-6 for t in pruned)
    assert all(t.user_attrs["epochs_run"] < 3 for t in pruned)
    assert len(trials) == 6  # a pruned trial is finished: the grid point is not run again


def test_a_diverging_trial_is_recorded_failed_and_the_search_goes_on(tmp_path, data_dir,
                                                                    monkeypatch):
    items = ["lr=1000,0.05", "hidden_size=8"]
    out = tmp_path / "out"
    assert search(out, data_dir, "--space", *items, "--warmup-epochs", "0",
                  monkeypatch=monkeypatch) == 0
    trials = load_trials(str(out / "study.journal"))
    states = {t.params["lr"]: t.state for t in trials}
    assert states == {1000: optuna.trial.TrialState.FAIL, 0.05: optuna.trial.TrialState.COMPLETE}
    row = next(r for r in json.loads((out / "trials.json").read_text())["trials"]
               if r["state"] == "FAIL")
    assert row["reason"].startswith("diverged: the loss became")
    search(out, data_dir, "--space", *items, "--warmup-epochs", "0", monkeypatch=monkeypatch)
    assert len(load_trials(str(out / "study.journal"))) == 2  # a failure is a result: kept


def test_random_search_counts_its_budget_over_reruns(tmp_path, data_dir, monkeypatch):
    args = ["--sampler", "random", "--sampler-seed", "1", "--space", "lr=1e-3:0.1:log",
            "hidden_size=4:16"]
    out = tmp_path / "out"
    search(out, data_dir, *args, "--n-trials", "3", monkeypatch=monkeypatch)
    search(out, data_dir, *args, "--n-trials", "3", monkeypatch=monkeypatch)
    assert len(load_trials(str(out / "study.journal"))) == 3
    search(out, data_dir, *args, "--n-trials", "5", monkeypatch=monkeypatch)
    trials = load_trials(str(out / "study.journal"))
    assert len(trials) == 5 and all(4 <= t.params["hidden_size"] <= 16 for t in trials)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)


# --- failures the search survives -------------------------------------------------------------

RUNNING = optuna.trial.TrialState.RUNNING
SLOW_FIRST = ["--space", "epochs=60,2,3", "--hidden-size", "8"]  # one long trial, two short


def journal_study(journal, name="search"):
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))


def wait_for(condition, what, timeout=60):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def trials_now(journal):
    """The trials of a search that may not have created its study yet."""
    try:
        return load_trials(str(journal))
    except (OSError, KeyError):
        return []


def running_trials(journal):
    return [t for t in trials_now(journal) if t.state == RUNNING and "worker" in t.user_attrs]


def start(out_dir, data_dir, *args, prefix=(), log):
    """Start the search as a command in its own process group, output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen([*prefix, *command(out_dir, data_dir, *args)], stdout=f,
                                stderr=subprocess.STDOUT, env=environment(),
                                start_new_session=True)


def descendants(pid):
    """The pids of every live process below `pid`."""
    parents = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def namespaces(*flags):
    """Skip unless this runs as root with unshare able to make these namespaces."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare")
    probe = subprocess.run(["unshare", *flags, "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"unshare {' '.join(flags)} fails here: {probe.stderr.decode().strip()}")
    return ["unshare", *flags]


def stop_outside_locks(pid, journal):
    """SIGSTOP a search's process group at a moment it holds neither the journal's write
    lock nor the claim lock (a stopped holder would block everyone, by design)."""
    while True:
        os.killpg(pid, signal.SIGSTOP)
        if all(lock_is_free(path) for path in (journal, f"{journal}.claim")):
            return
        os.killpg(pid, signal.SIGCONT)
        time.sleep(0.01)


def lock_is_free(path):
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False


def test_a_resumed_seeded_search_draws_new_points(tmp_path, data_dir, monkeypatch):
    args = ["--sampler", "random", "--sampler-seed", "0", "--space", "lr=1e-3:0.1:log",
            "hidden_size=4:16"]
    points = []
    for out in (tmp_path / "a", tmp_path / "b"):
        search(out, data_dir, *args, "--n-trials", "3", monkeypatch=monkeypatch)
        search(out, data_dir, *args, "--n-trials", "6", monkeypatch=monkeypatch)
        points.append([_key(t.params) for t in load_trials(str(out / "study.journal"))])
    assert len(set(points[0])) == 6  # the rerun did not repeat the first three
    assert points[0] == points[1]  # and the same commands draw the same points


def _key(params):
    return tuple(sorted(params.items()))


@pytest.mark.parametrize("backend", ["journal", "postgresql"])
def test_a_trial_left_running_by_a_dead_worker_on_another_host_runs_again(
        tmp_path, data_dir, backend, request, monkeypatch):
    """No heartbeat, another hostname: only the worker's token can tell that it died."""
    items, out = ["lr=0.05,0.02"], tmp_path / "out"
    storage, name = str(out / "study.journal"), "search"
    if backend == "postgresql":
        storage, name = request.getfixturevalue("postgres_url"), f"orphan-{uuid.uuid4().hex[:8]}"
    args = ["--space", *items, "--storage", storage, "--study-name", name]
    search(out, data_dir, *args, "--n-trials", "1", monkeypatch=monkeypatch)  # one left queued
    study = (journal_study(storage) if backend == "journal"
             else optuna.load_study(study_name=name, storage=storage))
    orphan = study.ask()  # taken by a worker on another machine, which then died
    orphan.set_user_attr("worker", {"host": "elsewhere", "pid": 4242, "start": 1,
                                    "token": uuid.uuid4().hex})
    search(out, data_dir, *args, monkeypatch=monkeypatch)
    trials = load_trials(storage, name)
    assert_grid_once(trials, items)
    assert [t.number for t in trials if t.state != optuna.trial.TrialState.COMPLETE] == \
        [orphan.number]


def test_a_search_killed_under_another_hostname_resumes(tmp_path, data_dir):
    prefix = namespaces("--uts") + ["sh", "-c", 'hostname elsewhere && exec "$@"', "sh"]
    out, journal = tmp_path / "out", tmp_path / "out" / "study.journal"
    first = start(out, data_dir, *SLOW_FIRST, prefix=prefix, log=tmp_path / "first.log")
    try:
        wait_for(lambda: running_trials(journal), "the long trial to start")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert running_trials(journal)[0].user_attrs["worker"]["host"] == "elsewhere"
    run(out, data_dir, *SLOW_FIRST)
    trials = load_trials(str(journal))
    assert_grid_once(trials, ["epochs=60,2,3"])
    assert not [t for t in trials if t.state == RUNNING]


def test_a_live_trial_in_another_pid_namespace_is_left_alone(tmp_path, data_dir):
    prefix = namespaces("--pid", "--fork", "--mount-proc")
    journal = tmp_path / "study.journal"
    args = [*SLOW_FIRST, "--storage", str(journal)]
    first = start(tmp_path / "a", data_dir, *args, prefix=prefix, log=tmp_path / "a.log")
    try:
        wait_for(lambda: running_trials(journal), "the long trial to start")
        stop_outside_locks(first.pid, journal)  # alive, holding its trial, but not moving
        printed = run(tmp_path / "b", data_dir, *args)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert first.wait(timeout=120) == 0, (tmp_path / "a.log").read_text()
    assert "2 to run" in printed and "1 running" in printed
    trials = load_trials(str(journal))
    assert len(trials) == 3
    assert_grid_once(trials, ["epochs=60,2,3"])


def test_a_trial_retired_while_it_runs_is_reported_not_a_crash(tmp_path, data_dir, capsys,
                                                              monkeypatch):
    """As after a false 'dead' verdict: another worker fails the trial while it trains."""
    items, out = ["lr=0.05,0.02"], tmp_path / "out"
    real_train, retired = ht.train.train, []

    def train_then_retire(config, **kwargs):
        result = real_train(config, **kwargs)
        if not retired:
            study = journal_study(out / "study.journal")
            retired.append(next(t.number for t in study.get_trials() if t.state == RUNNING))
            study.tell(retired[0], state=optuna.trial.TrialState.FAIL)
        return result

    monkeypatch.setattr(ht.train, "train", train_then_retire)
    assert search(out, data_dir, "--space", *items, monkeypatch=monkeypatch) == 0
    assert f"trial {retired[0]} was retired by another worker" in capsys.readouterr().out
    trials = load_trials(str(out / "study.journal"))
    assert_grid_once(trials, items)  # its point ran again
    assert len(trials) == 3


def test_a_torn_last_line_of_the_journal_is_moved_aside(tmp_path, data_dir, capsys,
                                                        monkeypatch):
    items, out = ["lr=0.05,0.02"], tmp_path / "out"
    journal = out / "study.journal"
    search(out, data_dir, "--space", *items, "--n-trials", "1", monkeypatch=monkeypatch)
    done = [t.value for t in load_trials(str(journal))]
    last = journal.read_bytes().splitlines()[-1]
    with open(journal, "ab") as f:  # a full disk or a power cut during an append
        f.write(last[:len(last) // 2])
    assert search(out, data_dir, "--space", *items, monkeypatch=monkeypatch) == 0
    assert "moved it to" in capsys.readouterr().err
    assert (out / "study.journal.torn").read_bytes() == last[:len(last) // 2] + b"\n"
    trials = load_trials(str(journal))
    assert_grid_once(trials, items)
    assert trials[0].value == done[0]  # the finished trial is kept


def test_a_torn_line_of_any_length_is_moved_aside_whole(tmp_path, data_dir, capsys,
                                                        monkeypatch):
    """Issue 24, item 4: the repair read back at most 1 MiB, but a space file within its limit
    makes journal lines of 2.25 MB; cut in one, the study failed with JSONDecodeError for
    good."""
    items, out = ["lr=0.05,0.02"], tmp_path / "out"
    journal = out / "study.journal"
    search(out, data_dir, "--space", *items, "--n-trials", "1", monkeypatch=monkeypatch)
    torn = b'{"op_code": 5, "worker_id": "' + b"x" * (5 << 19)  # 2.5 MB, cut short
    with open(journal, "ab") as f:
        f.write(torn)
    assert search(out, data_dir, "--space", *items, monkeypatch=monkeypatch) == 0
    assert f"unfinished line ({len(torn)} bytes" in capsys.readouterr().err
    assert (out / "study.journal.torn").read_bytes() == torn + b"\n"
    assert_grid_once(load_trials(str(journal)), items)


def test_a_point_cut_again_and_again_reruns_its_latest_trial_in_its_first_folder(tmp_path):
    """Each rerun of a point that keeps being cut continues the trial cut last (retry_of),
    always in the folder of the first."""
    plan = ht.make_plan(ht.build_parser().parse_args(
        ["--space", "lr=0.05", "--out-dir", str(tmp_path / "out")]))
    worker = ht.Worker(plan)
    try:
        for number in range(4):
            trial = worker.claim()
            assert trial.number == number and trial.params == {"lr": 0.05}
            assert trial.user_attrs.get("retry_of") == (number - 1 if number else None)
            assert trial.user_attrs.get("folder", 0) == 0
            worker.study.tell(trial, state=optuna.trial.TrialState.FAIL)  # cut: no reason
    finally:
        worker.close()


def test_matplotlib_is_loaded_before_a_trial_can_be_cut_in_its_import(tmp_path, data_dir):
    """A signal at a trial's end landed in train's first import of matplotlib, half-loading
    it: the report after the signal then failed (KeyError 'PolyCollection:kwdoc', exit 1). Here
    that import is interrupted on purpose whenever it happens once a trial has begun."""
    script = f"""
import sys
sys.path.insert(0, {os.path.dirname(SCRIPT)!r})
import cli, hyperparam_tuning as ht
training = []
def trace(frame, event, arg):  # Ctrl-C deep inside matplotlib.collections' first import
    where = frame.f_globals.get("__name__"), frame.f_code.co_name  # once a trial has begun
    training.extend([True] if where == ("train", "train") else [])
    if training and where == ("matplotlib.collections", "<module>"):
        return line
def line(frame, event, arg):
    if frame.f_lineno > 1500:
        sys.settrace(None)
        raise KeyboardInterrupt
    return line
sys.settrace(trace)
cli.run(ht.main, {command(tmp_path / "out", data_dir, "--space", "lr=0.05")[2:]!r})
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=environment(), timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out" / search_report.FILES["history"]).exists()


def test_a_full_disk_leaves_the_trial_to_run_again(tmp_path, data_dir, monkeypatch):
    """ENOSPC on curves.png (with a good checkpoint) is the machine's fault, not the trial's."""
    items, out = ["lr=0.05,0.02"], tmp_path / "out"
    real_write, hit = files.atomic_write, []

    @contextlib.contextmanager
    def full_disk(path, mode="wb"):
        if str(path).endswith("curves.png") and not hit:
            hit.append(path)
            raise cli.Error(f"cannot write {path}: No space left on device") from OSError(
                errno.ENOSPC, "No space left on device")
        with real_write(path, mode) as f:
            yield f

    monkeypatch.setattr(files, "atomic_write", full_disk)
    with pytest.raises(cli.Error, match="trial 0 stopped: .*No space left on device.*rerun"):
        search(out, data_dir, "--space", *items, monkeypatch=monkeypatch)
    first = load_trials(str(out / "study.journal"))[0]
    assert ht.interrupted(first) and "No space left" in first.user_attrs["failure"]
    assert search(out, data_dir, "--space", *items, monkeypatch=monkeypatch) == 0
    trials = load_trials(str(out / "study.journal"))
    assert_grid_once(trials, items)
    assert trials[-1].user_attrs["folder"] == 0  # the rerun went on in trial_0/


def test_a_really_full_disk_leaves_the_trial_to_run_again(tmp_path, data_dir):
    """The same on a tiny tmpfs (as root): the trial's state file does not fit."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    disk, journal = tmp_path / "disk", str(tmp_path / "study.journal")
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        args = ["--space", "lr=0.05,0.02", "--hidden-size", "8", "--storage", journal]
        done = subprocess.run(command(disk / "out", data_dir, *args), capture_output=True,
                              text=True, env=environment(), timeout=120)
        assert done.returncode == 1 and "No space left on device" in done.stderr, done.stderr
        first = load_trials(journal)[0]
        assert ht.interrupted(first) and "No space left" in first.user_attrs["failure"]
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        run(disk / "out", data_dir, *args)
        assert_grid_once(load_trials(journal), ["lr=0.05,0.02"])
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_second_study_in_the_same_out_dir_is_refused(tmp_path, data_dir, monkeypatch):
    out = tmp_path / "out"
    search(out, data_dir, "--space", "lr=0.05", "--study-name", "a", monkeypatch=monkeypatch)
    with pytest.raises(cli.Error, match=f"--out-dir {out} holds study 'a'"):
        search(out, data_dir, "--space", "lr=0.02", "--study-name", "b", monkeypatch=monkeypatch)
    assert sorted(p.name for p in out.glob("trial_*")) == ["trial_0"]


def test_best_npy_comes_only_from_the_study_s_own_trial_folders(tmp_path, data_dir, capsys,
                                                                monkeypatch):
    """A stored trial that names any file as its checkpoint gets it nowhere."""
    out, secret = tmp_path / "out", tmp_path / "secret"
    secret.write_text("not for best.npy")
    search(out, data_dir, "--space", "lr=0.05", monkeypatch=monkeypatch)
    study = journal_study(out / "study.journal")
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 0.05}, distributions={"lr": optuna.distributions.CategoricalDistribution(
            [0.05])}, value=1.5, user_attrs={"checkpoint": str(secret), "folder": 0}))
    (out / "trial_0" / "best.npy").write_text("not a checkpoint either")
    search(out, data_dir, "--space", "lr=0.05", monkeypatch=monkeypatch)
    assert "note: no best.npy here" in capsys.readouterr().out
    assert not (out / "best.npy").exists() or checkpoint.load_checkpoint(str(out / "best.npy"))
    assert (out / "best.npy").read_bytes() != secret.read_bytes()
    assert json.loads((out / "best_result.json").read_text())["checkpoint"] is None


def test_the_importance_plot_does_not_rely_on_optuna_s_default(tmp_path, data_dir,
                                                              monkeypatch):
    """Optuna 4's default evaluator (fANOVA) needs scikit-learn, which is not required."""
    real = optuna.importance.get_param_importances

    def like_optuna_4(study, evaluator=None, **kwargs):
        if evaluator is None:
            raise ImportError("fANOVA needs scikit-learn")
        return real(study, evaluator=evaluator, **kwargs)

    monkeypatch.setattr(optuna.importance, "get_param_importances", like_optuna_4)
    out = tmp_path / "out"
    search(out, data_dir, "--space", "lr=0.05,0.02", "hidden_size=8,16", monkeypatch=monkeypatch)
    assert (out / "param_importance.png").exists()


def test_the_history_plot_numbers_trials_with_whole_numbers(tmp_path, data_dir, monkeypatch):
    drawn, real_save = {}, utils.save_figure
    monkeypatch.setattr(utils, "save_figure",
                        lambda fig, path, **kw: (drawn.update({os.path.basename(path): fig}),
                                                 real_save(fig, path, **kw)))
    search(tmp_path / "out", data_dir, "--space", "lr=0.05,0.02", monkeypatch=monkeypatch)
    ticks = drawn["optimization_history.png"].axes[0].get_xticks()
    assert len(ticks) and all(t == int(t) for t in ticks)
    assert "val_acc_lr.png" in drawn and "val_acc_lr_reg.png" not in drawn


# --- signals, kills and busy folders ------------------------------------------------------


LONG_PAIR = ["--space", "epochs=100,101", "--hidden-size", "8", "--workers", "2"]


def start_two_workers(tmp_path, data_dir):
    """A search whose two workers are both training: (out, journal, parent, worker pids)."""
    out, journal = tmp_path / "out", tmp_path / "out" / "study.journal"
    parent = start(out, data_dir, *LONG_PAIR, log=tmp_path / "log")
    try:
        wait_for(lambda: len(running_trials(journal)) == 2, "both workers to train")
    except BaseException:
        os.killpg(parent.pid, signal.SIGKILL)
        raise
    return out, journal, parent, descendants(parent.pid)


def test_sigterm_to_a_two_worker_search_stops_every_process(tmp_path, data_dir, monkeypatch):
    out, journal, parent, workers = start_two_workers(tmp_path, data_dir)
    try:
        with pytest.raises(cli.Error, match=f"{out} is in use by another run \\(pid "
                                            f"{parent.pid}\\)"):  # one search per folder
            search(out, data_dir, *LONG_PAIR, monkeypatch=monkeypatch)
        parent.send_signal(signal.SIGTERM)  # the parent only, as a scheduler does
        assert parent.wait(timeout=60) == 128 + signal.SIGTERM, (tmp_path / "log").read_text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(parent.pid, signal.SIGKILL)
    assert len(workers) >= 2  # and multiprocessing's resource tracker, which ends on its own
    wait_for(lambda: not [pid for pid in workers if alive(pid)], "every process to end", 10)
    trials = load_trials(str(journal))
    assert [t.user_attrs["failure"] for t in trials] == ["interrupted: stopped by a signal"] * 2
    assert "stopped by SIGTERM" in (tmp_path / "log").read_text()


def test_workers_stop_when_their_parent_is_killed(tmp_path, data_dir):
    _, journal, parent, workers = start_two_workers(tmp_path, data_dir)
    try:
        parent.kill()  # the parent alone, without a word to its workers
        parent.wait()
        wait_for(lambda: not [pid for pid in workers if alive(pid)], "the workers to stop")
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
    assert all(ht.interrupted(t) for t in load_trials(str(journal)))


def test_a_killed_worker_is_named_by_the_parent(tmp_path, data_dir):
    out, journal = tmp_path / "out", tmp_path / "out" / "study.journal"
    args = [*SLOW_FIRST, "--workers", "2"]
    parent = start(out, data_dir, *args, log=tmp_path / "log")
    try:
        wait_for(lambda: running_trials(journal), "a long trial")
        os.kill(running_trials(journal)[0].user_attrs["worker"]["pid"], signal.SIGKILL)
        assert parent.wait(timeout=120) == 1
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
    printed = (tmp_path / "log").read_text()
    assert "was killed by SIGKILL; its trial will run again: rerun the command" in printed
    run(out, data_dir, *args)
    assert_grid_once(load_trials(str(journal)), ["epochs=60,2,3"])


def test_a_worker_stopped_by_a_signal_of_its_own_is_named_by_the_parent(tmp_path, data_dir):
    """SIGTERM to one worker alone (the other done) cuts its trial: the parent must not end
    with status 0 as if the grid were done."""
    out, journal = tmp_path / "out", tmp_path / "out" / "study.journal"
    args = ["--space", "epochs=1000,2", "--hidden-size", "8", "--workers", "2"]
    parent = start(out, data_dir, *args, log=tmp_path / "log")
    try:
        wait_for(lambda: [t for t in trials_now(journal) if t.state.is_finished()]
                 and running_trials(journal), "the short trial done, the long one running")
        done = [t for t in trials_now(journal) if t.state.is_finished()][0]
        wait_for(lambda: not alive(done.user_attrs["worker"]["pid"]), "its worker to end")
        os.kill(running_trials(journal)[0].user_attrs["worker"]["pid"], signal.SIGTERM)
        assert parent.wait(timeout=120) == 1, (tmp_path / "log").read_text()
    finally:
        os.killpg(parent.pid, signal.SIGKILL)
    printed = (tmp_path / "log").read_text()
    assert "was stopped by a signal; its trial will run again: rerun the command" in printed
    assert [ht.interrupted(t) for t in load_trials(str(journal))] == [True, False]


# --- optuna-dashboard -----------------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"
DASHBOARD_STUDY = "dashboard-check"


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory, data_dir):
    """optuna-dashboard on 127.0.0.1, serving the default journal of a short search."""
    assert shutil.which("optuna-dashboard"), "optuna-dashboard is missing: see requirements.txt"
    out = tmp_path_factory.mktemp("dashboard") / "out"
    run(out, data_dir, "--space", "lr=0.05,0.02", "--study-name", DASHBOARD_STUDY)
    url = f"http://127.0.0.1:{_free_port()}"
    server = subprocess.Popen([shutil.which("optuna-dashboard"), str(out / "study.journal"),
                               "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: server.poll() is not None or _get(url + "/api/meta"), "the dashboard")
        assert server.poll() is None, "optuna-dashboard stopped"
        yield url, out
    finally:
        server.terminate()
        server.wait(timeout=30)


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def test_the_dashboard_lists_the_study_and_its_trials(dashboard):
    url, out = dashboard
    studies = _get(url + "/api/studies")["study_summaries"]
    assert [s["study_name"] for s in studies] == [DASHBOARD_STUDY]
    trials = _get(f"{url}/api/studies/{studies[0]['study_id']}")["trials"]
    assert [(t["number"], t["state"]) for t in trials] == [(0, "Complete"), (1, "Complete")]
    stored = json.loads((out / "trials.json").read_text())["trials"]
    assert [t["values"][0] for t in trials] == [row["best_val_acc"] for row in stored]


def test_the_dashboard_page_shows_the_study_in_a_browser(dashboard, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no {CHROMIUM} (Debian: apt-get install chromium)")
    url, _ = dashboard
    browser = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
               "--virtual-time-budget=10000", "--window-size=1280,900"]
    page = subprocess.run([*browser, "--dump-dom", url + "/dashboard"], capture_output=True,
                          text=True, timeout=120)
    assert DASHBOARD_STUDY in page.stdout, page.stderr[-2000:]
    shot = tmp_path / "dashboard.png"
    subprocess.run([*browser, f"--screenshot={shot}", url + "/dashboard/studies/0"],
                   capture_output=True, timeout=120)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- one study shared through PostgreSQL ------------------------------------------------------


def _postgres_bin():
    found = shutil.which("pg_ctl")
    if found:
        return os.path.dirname(found)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
                        key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    return os.path.dirname(candidates[-1]) if candidates else None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL server on 127.0.0.1 (or $MLP_TEST_POSTGRES_URL's server)."""
    if os.environ.get("MLP_TEST_POSTGRES_URL"):
        yield os.environ["MLP_TEST_POSTGRES_URL"]
        return
    bin_dir = _postgres_bin()
    if bin_dir is None:
        pytest.skip("no PostgreSQL server binaries (Debian: apt-get install postgresql), "
                    "and MLP_TEST_POSTGRES_URL is not set")
    as_user = []
    if os.geteuid() == 0:  # the server refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to start PostgreSQL as postgres")
        try:
            import pwd
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server")
        as_user = ["runuser", "-u", "postgres", "--"]
    root = tempfile.mkdtemp(prefix="test-tuning-pg-")
    if as_user:
        shutil.chown(root, "postgres")
    data, port = os.path.join(root, "data"), _free_port()

    def pg(tool, *args):
        subprocess.run([*as_user, os.path.join(bin_dir, tool), *args], check=True,
                       capture_output=True, timeout=60)

    try:
        pg("initdb", "-D", data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync",
           "--locale=C")
        pg("pg_ctl", "-D", data, "-l", os.path.join(root, "log"), "-w", "-t", "30", "-o",
           f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_processes_share_one_study_through_postgresql(tmp_path, data_dir, postgres_url):
    """Two commands (as on two machines) start together against one fresh database."""
    items = ["lr=0.05,0.02", "hidden_size=8,16", "seed=0,1"]
    name = f"shared-{uuid.uuid4().hex[:8]}"
    args = ["--space", *items, "--storage", postgres_url, "--study-name", name,
            "--epochs", "20"]
    machines = [subprocess.Popen(command(tmp_path / f"machine{i}", data_dir, *args),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 env=environment()) for i in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in machines]
    assert [p.returncode for p in machines] == [0, 0], outputs
    trials = load_trials(postgres_url, name)
    assert len(trials) == 8  # none duplicated, none lost
    assert_grid_once(trials, items)
    workers = {t.user_attrs["worker"]["pid"] for t in trials}
    assert len(workers) == 2, "both processes should have taken trials"


def test_the_plan_checks_the_largest_network_of_the_space(monkeypatch):
    """Issue 24, item 11: each hidden size of the space, with the most inputs and the widest
    dtype it holds, must fit this process's memory and the checkpoint format, before any data
    is read."""
    monkeypatch.setattr(ht.train, "memory_available", lambda: 1 << 30)
    args = ["--space", "hidden_size=256,16000", "whiten=0,256"]
    with pytest.raises(cli.Error, match="--space: --hidden-size 16000 16000 needs 3 GiB"):
        ht.make_plan(ht.build_parser().parse_args(args))
    args = ["--space", "hidden_size=256,4100", "dtype=float32,float64"]
    with pytest.raises(cli.Error, match="--space: .*4100 with --dtype float64 .*would not load"):
        ht.make_plan(ht.build_parser().parse_args(args))
    ht.make_plan(ht.build_parser().parse_args(["--space", "hidden_size=256,4100"]))


def test_the_search_sweeps_its_own_stale_temporary_files(tmp_path, data_dir, monkeypatch):
    """Issue 24, item 10: .optimization_history.png.*.tmp stayed after a kill -9 during the
    report; the search, holding its --out-dir, now removes what killed writers left."""
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / f".{name}.deadbeef.tmp" for name in ("optimization_history.png",
                                                         "val_acc_lr_reg.png", "trials.json")]
    for path in stale:
        path.write_bytes(b"left by a killed report")
    assert search(out, data_dir, "--space", "lr=0.05", monkeypatch=monkeypatch) == 0
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize("fifo", ["trials.json", "study.journal.claim",
                                  "study.journal.workers/" + "0" * 32])
def test_search_files_that_are_fifos_are_refused_not_waited_on(tmp_path, data_dir, fifo):
    """Issue 24, item 6: each of these hung the search forever."""
    out = tmp_path / "out"
    (out / "study.journal.workers").mkdir(parents=True)
    os.mkfifo(out / fifo)
    done = subprocess.run(command(out, data_dir, "--space", "lr=0.05"), capture_output=True,
                          text=True, env=environment(), timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "FIFO" in lines[0] or "trials.json cannot be read" in lines[0], done.stderr


CHECK_OUT_DIR = ("lambda out: __import__('search_report').check_out_dir("
                 "{'out_dir': out, 'study_name': 'search', 'storage': out + '/study.journal'})")


@pytest.mark.parametrize("content", [
    lambda: "[" * 200_000 + "]" * 200_000,  # gave error: RecursionError
    lambda: json.dumps({"study": "other", "storage": "/x\x1b]0;owned\x07", "trials": []}),
    lambda: '{"study": "search", "storage": "?", "trials": [' + "{}," * (20 << 20) + "{}]}",
], ids=["nested", "escape sequence", "60 MB"])
def test_a_hostile_trials_json_is_one_clear_refusal(tmp_path, content):
    """Issue 24, item 6: only the head of trials.json is read (100 MB took 2.5 GB, deep
    nesting gave error: RecursionError), and the storage it names is escaped when printed."""
    (tmp_path / "trials.json").write_text(content())
    report = measured(CHECK_OUT_DIR, tmp_path)
    assert "holds study" in report["error"] and report["maxrss_mb"] < 100, report
    assert cli.one_line(report["error"]).isprintable()


def test_a_huge_grid_is_refused_up_front_with_its_count(tmp_path, data_dir):
    """Issue 24, item 8: a space file describing millions of grid points had grid() build
    them all in memory, then queue them for hours."""
    space = {"lr": [k / 1000 for k in range(1, 101)], "reg": [k / 1000 for k in range(100)],
             "momentum": [k / 100 for k in range(100)], "seed": list(range(100))}
    (tmp_path / "space.json").write_text(json.dumps(space))

    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    done = subprocess.run(command(tmp_path / "out", data_dir, "--space-file",
                                  tmp_path / "space.json"), capture_output=True, text=True,
                          env=environment(), timeout=120, preexec_fn=limit)
    assert done.returncode == 2, done.stderr
    assert "the space holds 100,000,000 combinations, more than the 10,000" in done.stderr
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_search_whose_folder_goes_stops_and_makes_nothing_there(tmp_path, data_dir):
    """Issue 24, item 2, for a search: its workers hold --out-dir too, and the journal must be
    the one opened; none of them makes the folder again or writes in another's."""
    out, moved = tmp_path / "out", tmp_path / "moved"
    process = subprocess.Popen(command(out, data_dir, "--space", "lr=0.05,0.02,0.01,0.03",
                                       "--epochs", "40", "--workers", "2"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=environment())
    try:
        deadline = time.monotonic() + 60
        while not glob.glob(str(out / "trial_*" / "history.json")):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.02)
        os.rename(out, moved)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
        process.communicate()
    lines = err.splitlines()  # one per worker, then the search's own
    assert process.returncode == 1 and all(line.startswith("error: ") for line in lines), err
    assert "out was moved or deleted" in lines[-1] and not out.exists()
