"""hyperparam_tuning.py: search spaces, grid coverage, resume after a kill, pruning, failures,
and one study shared by processes through a real PostgreSQL server, on tiny synthetic data."""
import glob
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import numpy as np
import optuna
import pytest

import cli
import hyperparam_tuning as ht
import model
from conftest import CLASS_NAMES, FOLDER, TRAIN_FILES, batch_bytes

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "hyperparam_tuning.py")
# Tiny, fast trials: 250 training and 50 validation images, a few epochs.
TINY = ["--val-size", "50", "--batch-size", "50", "--epochs", "2", "--preset", "fast"]


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
    return ht.main([*args, *TINY, "--data-dir", data_dir, "--out-dir", str(out_dir)])


def command(out_dir, data_dir, *args):
    return [sys.executable, SCRIPT, *args, *TINY, "--data-dir", data_dir,
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
    return [tuple(sorted(c.items())) for c in ht.grid(ht.parse_space(space_items))]


def assert_grid_once(trials, space_items):
    """Every combination has exactly one complete trial, and nothing else completed."""
    complete = [tuple(sorted(t.params.items())) for t in trials
                if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(complete) == sorted(combinations(space_items))


# --- the search space and the checks before any work ------------------------------------------


def test_space_items_are_typed_like_the_defaults():
    space = ht.parse_space(["lr=0.01,0.05", "hidden-size=256,512x256", "flip=true,no",
                            "reg_lambda=1e-4:1e-2:log", "epochs=2:5", "activation=relu"])
    assert space["lr"] == {"choices": [0.01, 0.05]}
    assert space["hidden_size"] == {"choices": ["256x256", "512x256"]}
    assert space["flip"] == {"choices": [True, False]}
    assert space["reg"] == {"low": 1e-4, "high": 1e-2, "log": True, "int": False}
    assert space["epochs"] == {"low": 2, "high": 5, "log": False, "int": True}
    assert ht.config_values({"hidden_size": "512x256"})["hidden_size"] == [512, 256]
    assert ht.config_values({"hidden_size": 64})["hidden_size"] == [64, 64]
    assert len(ht.grid({k: space[k] for k in ("lr", "hidden_size", "flip")})) == 8


def test_space_file_and_items_combine(tmp_path):
    path = tmp_path / "space.json"
    path.write_text(json.dumps({"lr": [0.01, 0.05], "hidden_size": [256, [512, 256]],
                                "reg": {"low": 1e-5, "high": 1e-3, "log": True},
                                "activation": "relu,tanh"}))
    space = ht.load_space_file(path)
    assert space["hidden_size"] == {"choices": ["256x256", "512x256"]}
    assert space["reg"]["log"] and space["activation"] == {"choices": ["relu", "tanh"]}
    args = ht.build_parser().parse_args(["--space-file", str(path), "--space", "lr=0.1",
                                         "--sampler", "tpe"])
    assert ht.make_plan(args)["space"]["lr"] == {"choices": [0.1]}  # the item wins


def test_default_space_is_a_small_grid_close_to_the_report():
    plan = ht.make_plan(ht.build_parser().parse_args([]))
    assert list(plan["space"]) == ["lr", "hidden_size", "reg", "activation"]
    assert len(ht.grid(plan["space"])) == 16 and plan["n_trials"] is None
    step = ht.make_plan(ht.build_parser().parse_args(["--lr-schedule", "step"]))
    assert "lr_decay" in step["space"] and len(ht.grid(step["space"])) == 32
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


def test_usage_errors_exit_2(tmp_path, data_dir, capsys):
    for bad in (["--workers", "0"], ["--sampler", "bayes"], ["--study-name", "a/b"]):
        with pytest.raises(SystemExit) as exit_info:
            search(tmp_path / "out", data_dir, *bad)
        assert exit_info.value.code == 2
    assert capsys.readouterr().err.count("error:") == 3
    assert not (tmp_path / "out").exists()


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
                                        "activation", "lr_decay"}
    assert best["best_val_acc"] == max(t.value for t in trials) > 0.5
    assert (out / "best.npy").read_bytes() == open(best["trial_checkpoint"], "rb").read()
    net, meta = model.load_checkpoint(str(out / "best.npy"))
    assert meta["config"]["lr"] == best["best_params"]["learning_rate"]
    for name in ("optimization_history.png", "param_importance.png", "val_acc_lr_reg.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Rerunning the same command finds nothing to do and changes nothing.
    assert search(out, data_dir, "--space", *items, monkeypatch=monkeypatch) == 0
    assert "0 to run" in capsys.readouterr().out
    assert [t.datetime_complete for t in load_trials(str(out / "study.journal"))] == \
        [t.datetime_complete for t in trials]


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


def test_a_killed_search_resumes_with_only_the_missing_trials(tmp_path, data_dir):
    items = ["lr=0.05,0.02", "hidden_size=8,16", "seed=0,1"]
    out, journal = tmp_path / "out", str(tmp_path / "out" / "study.journal")
    slow = ["--space", *items, "--workers", "2", "--epochs", "40"]  # ~0.3 s per trial
    log = tmp_path / "first.log"
    with open(log, "w") as f:
        first = subprocess.Popen(command(out, data_dir, *slow), stdout=f, stderr=f,
                                 env=environment(), start_new_session=True)
    try:
        deadline = time.time() + 60
        while log.read_text().count(" complete ") < 2 and first.poll() is None:
            assert time.time() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the parent and its workers, mid-search
        first.wait()
    assert first.returncode == -signal.SIGKILL, log.read_text()

    before = {t.number: t for t in load_trials(journal)
              if t.state == optuna.trial.TrialState.COMPLETE}
    assert 2 <= len(before) < 8
    printed = run(out, data_dir, *slow)
    trials = load_trials(journal)
    assert_grid_once(trials, items)
    for t in trials:  # earlier results are kept as they were
        if t.number in before:
            assert t.state == before[t.number].state and t.value == before[t.number].value
    ran_now = [line for line in printed.splitlines() if line.startswith("trial ")]
    assert len(ran_now) == 8 - len(before), printed
    # Trials cut by the kill are failed as interrupted and run again under a new number.
    cut = [t for t in trials if t.state == optuna.trial.TrialState.FAIL]
    assert all(ht.interrupted(t) for t in cut)
    assert len(trials) == 8 + len(cut)


def test_pruning_stops_hopeless_trials(tmp_path, data_dir, monkeypatch):
    # Good trials first (the grid runs in the order given), then ones that cannot learn.
    items = ["lr=0.05,1e-6", "seed=0,1,2"]
    out = tmp_path / "out"
    search(out, data_dir, "--space", *items, "--epochs", "3", "--pruner", "median",
           "--prune-startup", "2", monkeypatch=monkeypatch)
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
