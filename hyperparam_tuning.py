"""Search train.py's options with Optuna: a grid (each combination once), random or TPE.

    python hyperparam_tuning.py                       # the default grid: lr x hidden x reg x act
    python hyperparam_tuning.py --space lr=0.02,0.05 hidden_size=256,512x256 --epochs 5
    python hyperparam_tuning.py --sampler tpe --space lr=1e-3:0.1:log reg=1e-5:1e-2:log \\
        --n-trials 30 --pruner median --workers 2
    python hyperparam_tuning.py --storage postgresql+psycopg2://user@host/db   # on each machine

Each trial is one train.train() run saved in <out-dir>/trial_<number>/. The study is kept
in an Optuna journal file (<out-dir>/study.journal) or in the --storage database, so the
same command run again resumes it: finished trials are kept and trials cut short by a kill
are run again. Results in <out-dir>: trials.json, trials.csv, best_result.json, best.npy
(the best trial's checkpoint, for test.py) and three plots.
"""
import argparse
import csv
import functools
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import socket
import sys
import time
import warnings
import zlib

import optuna
from optuna.trial import TrialState

import cli
import config as cfg
import data_loader
import model
import train

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "halving")
DEFAULT_PRESET = "fast"
# Close to the report's grid (learning rate x hidden size x regularisation x activation x
# decay), small enough for an afternoon; lr_decay joins when the schedule is `step`.
DEFAULT_SPACE = ["lr=0.01,0.05", "hidden_size=256,512", "reg=1e-4,1e-3", "activation=relu,tanh"]
DEFAULT_DECAYS = "lr_decay=0.9,0.95"
ALIASES = {"learning_rate": "lr", "reg_lambda": "reg"}  # the report's names
NOT_SEARCHED = ("data_dir", "save_dir")
TRAIN_OPTIONS = {k: v for k, v in cfg.DEFAULT_CONFIG.items() if k != "save_dir"}
# Base-configuration keys a machine may set differently from the others in one study.
LOCAL_KEYS = ("data_dir", "save_dir")
HEARTBEAT_SECONDS = 30  # RDB storages: a running trial silent for 2x this is retried
BLAS_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
FILES = {"json": "trials.json", "csv": "trials.csv", "best": "best_result.json",
         "model": "best.npy", "history": "optimization_history.png",
         "importance": "param_importance.png", "lr_reg": "val_acc_lr_reg.png"}


# --- search space -----------------------------------------------------------------------------
# A space maps config keys to {"choices": [...]} or {"low", "high", "log", "int"}.
# hidden_size choices are strings "AxB" (Optuna's categorical values must be scalars).


def parse_space(items):
    """The search space of `key=v1,v2,...` (choices) and `key=lo:hi[:log]` (range) items."""
    space = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not text.strip():
            raise cli.Error(f"--space takes KEY=VALUES items such as lr=0.01,0.05; got {item!r}")
        key = space_key(name)
        if key in space:
            raise cli.Error(f"--space names {key} twice")
        space[key] = parse_param(key, text)
    return space


def load_space_file(path):
    """The search space in a JSON file: {"lr": [0.01, 0.05], "reg": {"low": 1e-4, "high":
    1e-2, "log": true}, "hidden_size": [256, [512, 256]], "activation": "relu,tanh"}."""
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError as exc:
        raise cli.Error(f"cannot read --space-file {path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise cli.Error(f"--space-file {path} is not valid JSON: {exc}") from None
    if not isinstance(spec, dict):
        raise cli.Error(f"--space-file {path} must hold a JSON object of key: values")
    space = {}
    for name, value in spec.items():
        key = space_key(name)
        space[key] = parse_param(key, _as_text(key, value, path))
    return space


def _as_text(key, value, path):
    """A JSON value of a space file in the --space syntax."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        if set(value) - {"low", "high", "log"} or not {"low", "high"} <= set(value):
            raise cli.Error(f"--space-file {path}: {key} must be a list of values or "
                            f'{{"low": .., "high": .., "log": true|false}}')
        return f"{value['low']}:{value['high']}" + (":log" if value.get("log") else "")
    values = value if isinstance(value, list) else [value]

    def text(v):
        if isinstance(v, list):
            return "x".join(str(h) for h in v)
        return str(v).lower() if isinstance(v, bool) else str(v)

    return ",".join(text(v) for v in values)


def space_key(name):
    """The config key a --space name means (dashes, the report's names allowed)."""
    key = ALIASES.get(name.strip().replace("-", "_"), name.strip().replace("-", "_"))
    if key not in cfg.DEFAULT_CONFIG or key in NOT_SEARCHED:
        keys = ", ".join(k for k in cfg.DEFAULT_CONFIG if k not in NOT_SEARCHED)
        raise cli.Error(f"cannot search {name!r}: not a training option; choose from {keys}")
    return key


def parse_param(key, text):
    """One parameter: a list of choices, or a `lo:hi[:log]` range, typed like the default."""
    default = cfg.DEFAULT_CONFIG[key]
    if ":" not in text:
        values = [_parse_value(key, v) for v in text.split(",")]
        if len(set(values)) < len(values):
            raise cli.Error(f"--space {key} repeats a value: {text}")
        return {"choices": values}
    parts = [p.strip() for p in text.split(":")]
    log = parts[-1].lower() == "log"
    parts = parts[:-1] if log else parts
    if len(parts) != 2 or isinstance(default, (bool, str)):
        raise cli.Error(f"--space {key}={text}: a range is lo:hi or lo:hi:log, and only for "
                        f"numbers")
    is_int = isinstance(default, (int, list))  # a hidden-size range sizes both layers
    try:
        low, high = (int(p) if is_int else float(p) for p in parts)
    except ValueError:
        raise cli.Error(f"--space {key}={text}: bounds must be "
                        f"{'integers' if is_int else 'numbers'}") from None
    if not low < high or (log and low <= 0):
        raise cli.Error(f"--space {key}={text}: need lo < hi" + (" and lo > 0 for log" if log else ""))
    return {"low": low, "high": high, "log": log, "int": is_int}


def _parse_value(key, text):
    default, text = cfg.DEFAULT_CONFIG[key], text.strip()
    try:
        if isinstance(default, bool):
            return {"true": True, "1": True, "yes": True, "false": False, "0": False,
                    "no": False}[text.lower()]
        if isinstance(default, list):
            sizes = [int(h) for h in text.lower().split("x")]
            if len(sizes) not in (1, 2):
                raise ValueError
            return "x".join(str(h) for h in sizes * (3 - len(sizes)))
        return type(default)(text)
    except (KeyError, ValueError):
        kind = {bool: "true or false", list: "a size such as 512 or 512x256"}.get(
            type(default), type(default).__name__)
        raise cli.Error(f"--space {key}: cannot read {text!r} as {kind}") from None


def config_values(params):
    """Trial parameters as config overrides (hidden sizes back to a list of two ints)."""
    values = dict(params)
    hidden = values.get("hidden_size")
    if isinstance(hidden, str):
        values["hidden_size"] = [int(h) for h in hidden.split("x")]
    elif isinstance(hidden, int):
        values["hidden_size"] = [hidden, hidden]
    return values


def grid(space):
    """Every combination of a space of choices, in the order given."""
    keys = list(space)
    return [dict(zip(keys, values))
            for values in itertools.product(*(space[k]["choices"] for k in keys))]


def suggest(trial, space):
    """Ask Optuna for each parameter (a queued trial gets its queued values back)."""
    for key, p in space.items():
        if "choices" in p:
            trial.suggest_categorical(key, p["choices"])
        elif p["int"]:
            trial.suggest_int(key, p["low"], p["high"], log=p["log"])
        else:
            trial.suggest_float(key, p["low"], p["high"], log=p["log"])
    return {key: trial.params[key] for key in space}


# --- the plan: everything a worker needs, checked before any work starts ---------------------


def make_plan(args):
    """Check the command line and return the search as a plain (picklable) dict."""
    fixed = cli.overrides(args, TRAIN_OPTIONS)
    base = cfg.make_config(args.preset, **fixed)
    space = load_space_file(args.space_file) if args.space_file else {}
    space.update(parse_space(args.space or []))
    if not space:
        space = parse_space(DEFAULT_SPACE + ([DEFAULT_DECAYS] if base["lr_schedule"] == "step"
                                             else []))
        space = {k: p for k, p in space.items() if k not in fixed}
    both = sorted(set(space) & set(fixed))
    if both:
        raise cli.Error(f"--{both[0].replace('_', '-')} is fixed and also searched in --space; "
                        "drop one of them")
    if not space:
        raise cli.Error("the search space is empty")
    ranges = [k for k, p in space.items() if "choices" not in p]
    if args.sampler == "grid" and ranges:
        raise cli.Error(f"--sampler grid needs lists of values, but {ranges[0]} is a range "
                        "lo:hi; list values or use --sampler random or tpe")
    _check_values(args.preset, fixed, space)
    n_trials = args.n_trials
    if args.sampler != "grid" and n_trials is None and args.timeout is None:
        n_trials = 20
    name = args.study_name
    out_dir = args.out_dir or os.path.join("results", name)
    return {
        "study_name": name, "out_dir": out_dir,
        "storage": args.storage or os.path.join(out_dir, "study.journal"),
        "sampler": args.sampler, "sampler_seed": args.sampler_seed, "space": space,
        "preset": args.preset, "fixed": fixed, "base": base, "n_trials": n_trials,
        "deadline": time.time() + args.timeout if args.timeout else None,
        "pruner": args.pruner, "prune_startup": args.prune_startup,
        "prune_warmup": args.prune_warmup, "workers": args.workers, "top_k": args.top_k,
        "data_dir": base["data_dir"], "parent_pid": None,
    }


def _check_values(preset, fixed, space):
    """Every searched value (each choice, both ends of each range) makes a valid config."""
    for key, p in space.items():
        for value in p.get("choices", [p.get("low"), p.get("high")]):
            try:
                config = cfg.make_config(preset, **{**fixed, **config_values({key: value})})
                model.get_activation(config["activation"])
            except cli.Error as exc:
                raise cli.Error(f"--space {key}={value}: {exc}") from None
    if "lr_decay" in space and cfg.make_config(preset, **fixed)["lr_schedule"] != "step":
        print("note: lr_decay only acts with --lr-schedule step", file=sys.stderr)


def search_signature(plan):
    """What must match for a rerun to continue a stored study (not the budget, not paths)."""
    base = {k: v for k, v in plan["base"].items() if k not in LOCAL_KEYS}
    signature = {"sampler": plan["sampler"], "space": plan["space"], "config": base}
    return json.loads(json.dumps(signature))


# --- storage, study and the claim lock --------------------------------------------------------


class FileLock:
    """An exclusive lock on a file (flock): the kernel releases it when its process dies."""

    def __init__(self, path):
        self.path, self._file = path, None

    def acquire(self):
        import fcntl
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._file = open(self.path, "a")
        fcntl.flock(self._file, fcntl.LOCK_EX)
        return True

    def release(self):
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


class PostgresLock:
    """A PostgreSQL advisory lock: one holder among all machines sharing the database."""

    def __init__(self, url, name):
        import sqlalchemy
        self._engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self._key = zlib.crc32(f"hyperparam_tuning:{name}".encode())
        self._sql, self._connection = sqlalchemy.text, None

    def acquire(self):
        self._connection = self._engine.connect()
        self._connection.execute(self._sql("SELECT pg_advisory_lock(:k)"), {"k": self._key})
        return True

    def release(self):
        if self._connection is not None:
            try:
                self._connection.execute(self._sql("SELECT pg_advisory_unlock(:k)"),
                                         {"k": self._key})
            finally:  # the server also drops the lock when the session ends
                self._connection.close()
                self._connection = None


def is_url(storage):
    return "://" in storage


def shown(storage):
    """The storage for messages, without a password."""
    if not is_url(storage):
        return storage
    import sqlalchemy
    try:
        return sqlalchemy.engine.make_url(storage).render_as_string(hide_password=True)
    except Exception:
        return storage.split("://")[0] + "://..."


def claim_lock(plan):
    """The lock under which workers open the study and take trials (see Job.claim)."""
    target = plan["storage"]
    if not is_url(target):
        return FileLock(target + ".claim")
    import sqlalchemy
    try:
        backend = sqlalchemy.engine.make_url(target).get_backend_name()
    except Exception as exc:
        raise cli.Error(f"--storage {target!r} is not a database URL: {exc}") from None
    if backend == "postgresql":
        return PostgresLock(target, plan["study_name"])
    # Other databases: exact among the workers of one machine only (see the README).
    return FileLock(os.path.join(plan["out_dir"], ".claim.lock"))


def open_storage(plan):
    """The Optuna storage: a journal file, or a database with heartbeats for its trials."""
    target = plan["storage"]
    if not is_url(target):
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(
            target, lock_obj=FileLock(target + ".lock"))
        return optuna.storages.JournalStorage(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(target, heartbeat_interval=HEARTBEAT_SECONDS)


def make_sampler(plan, worker=0):
    seed = plan["sampler_seed"]
    seed = None if seed is None else seed + worker  # workers must not draw the same points
    if plan["sampler"] == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    # Grid trials come from the trial queue with every value fixed: no sampler is consulted.
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(plan):
    warmup = plan["prune_warmup"]
    if plan["pruner"] == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=plan["prune_startup"],
                                           n_warmup_steps=warmup)
    if plan["pruner"] == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup))
    return optuna.pruners.NopPruner()


def open_study(plan, storage, worker=0):
    """Create the study or load it, refusing one made by a different search."""
    study = optuna.create_study(storage=storage, study_name=plan["study_name"],
                                direction="maximize", load_if_exists=True,
                                sampler=make_sampler(plan, worker), pruner=make_pruner(plan))
    signature = search_signature(plan)
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", signature)
    elif stored != signature:
        changed = [k for k in ("sampler", "space") if stored.get(k) != signature[k]]
        changed += [f"{k} {stored['config'].get(k)!r} -> {v!r}"
                    for k, v in signature["config"].items() if stored["config"].get(k) != v]
        raise cli.Error(f"study {plan['study_name']!r} in {shown(plan['storage'])} holds a "
                        f"different search (changed: {', '.join(changed)}); rerun with the same "
                        "options, or pick a new --study-name")
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise cli.Error(f"study {plan['study_name']!r} does not maximise; pick a new --study-name")
    return study


# --- bookkeeping: which trials are done, which are missing ------------------------------------


def trial_params(trial):
    """A trial's parameters, also for a queued trial that has not suggested them yet."""
    return trial.system_attrs.get("fixed_params") or trial.params


def failure(trial):
    """Why a failed trial failed; one with no reason was cut short (its process died)."""
    if trial.state != TrialState.FAIL:
        return ""
    return trial.user_attrs.get("failure") or "interrupted: its worker stopped mid-trial"


def interrupted(trial):
    return failure(trial).startswith("interrupted")


def counted(trials):
    """Trials that use the budget: run or running, not queued, not cut short."""
    return sum(t.state != TrialState.WAITING and not interrupted(t) for t in trials)


def _key(params):
    return tuple(sorted(params.items()))


def process_id(pid=None):
    """This process as recorded in a trial: host, pid and start time (against pid reuse)."""
    pid = pid or os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "start": _start_time(pid)}


def _start_time(pid):
    """A live process's start time in clock ticks; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the (name), which may hold spaces
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZXx" else int(fields[19])  # fields 3 (state) and 22


def is_alive(worker):
    """Whether the process that took a trial still runs (other hosts: assume so)."""
    if worker.get("host") != socket.gethostname():
        return True
    if os.path.isdir("/proc"):
        start = _start_time(worker["pid"])
        return start is not None and worker.get("start") in (None, start)
    try:
        os.kill(worker["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def retire_dead(study):
    """Fail the running trials whose process died (only safe under the claim lock)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # heartbeat storages: other machines' trials
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # A trial is claimed and marked with its worker under the lock, so a running
        # trial without a worker lost its process between the two.
        worker = t.user_attrs.get("worker")
        if worker is None or not is_alive(worker):
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)


def queue_missing(study, plan):
    """Queue the grid combinations not yet run, and the parameters of interrupted trials."""
    trials = study.get_trials(deepcopy=False)
    if plan["sampler"] == "grid":
        taken = {_key(trial_params(t)) for t in trials if not interrupted(t)}
        for i, combination in enumerate(grid(plan["space"])):
            if _key(combination) not in taken:
                study.enqueue_trial(combination, user_attrs={"grid_point": i})
        return
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if interrupted(t) and trial_params(t) and t.number not in retried:
            study.enqueue_trial(trial_params(t), user_attrs={"retry_of": t.number})


def work_left(study, plan):
    trials = study.get_trials(deepcopy=False)
    if plan["n_trials"] is not None and counted(trials) >= plan["n_trials"]:
        return False
    return plan["sampler"] != "grid" or any(t.state == TrialState.WAITING for t in trials)


def prepare(study, plan):
    """Retire dead trials, queue what is missing; whether work is left. Hold the lock."""
    retire_dead(study)
    queue_missing(study, plan)
    return work_left(study, plan)


# --- workers ----------------------------------------------------------------------------------


class Job:
    """What one worker process holds: the plan, its data, storage, study and claim lock."""

    def __init__(self, plan, worker=0):
        self.plan, self.data = plan, None
        self.lock = claim_lock(plan)
        try:
            # Under the lock: machines starting together must not all create the tables.
            self.lock.acquire()
            try:
                self.storage = open_storage(plan)
                self.study = open_study(plan, self.storage, worker)
            finally:
                self.lock.release()
        except cli.Error:
            raise
        except Exception as exc:  # bad URL, no driver, no server: one line for the user
            raise cli.Error(f"cannot open --storage {shown(plan['storage'])}: "
                            f"{str(exc).splitlines()[0]}") from None

    def claim(self):
        """Take the claim lock if work is left; the trial's objective releases it.

        Checking for work and taking it (Optuna's ask) happen under one lock, so two
        workers never take the last queued trial, or the last trial of the budget, twice.
        """
        deadline, parent = self.plan["deadline"], self.plan["parent_pid"]
        if _stopping or (deadline and time.time() >= deadline) or (
                parent and os.getppid() != parent):
            return False
        self.lock.acquire()
        try:
            if prepare(self.study, self.plan):
                return True
        except BaseException:
            self.lock.release()
            raise
        self.lock.release()
        return False

    def run(self):
        """Run trials until the budget is spent, the grid is done or time is up."""
        objective = functools.partial(run_trial, job=self)
        while self.claim():
            try:
                self.study.optimize(objective, n_trials=1, catch=(Exception,))
            finally:
                self.lock.release()
            write_tables(self.study, self.plan)


def run_trial(trial, job):
    """Optuna's objective: one train.train() run; returns the best validation accuracy."""
    trial.set_user_attr("worker", process_id())
    job.lock.release()  # the trial is ours now: let other workers claim theirs
    plan, records, outcome = job.plan, [], "done"
    save_dir = os.path.join(plan["out_dir"], f"trial_{trial.number}")
    start = time.perf_counter()

    def on_epoch(record):
        records.append(record)
        trial.report(record["val_acc"], record["epoch"])
        if trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {record['val_acc']:.4f} "
                                     f"at epoch {record['epoch']}")

    try:
        if plan["sampler"] == "grid" and "grid_point" not in trial.user_attrs:
            raise RuntimeError("a grid trial was not taken from the queue")
        params = suggest(trial, plan["space"])
        config = cfg.make_config(plan["preset"], **plan["fixed"], **config_values(params),
                                 save_dir=save_dir)
        trial.set_user_attr("config", config)
        result = train.train(config, data=job.data, on_epoch=on_epoch, progress=False)
        if result["stopped"] == "interrupted":  # train.train keeps Ctrl-C to itself
            raise KeyboardInterrupt
        return result["best_val_acc"]
    except optuna.TrialPruned:
        outcome = "pruned"
        raise
    except KeyboardInterrupt:
        outcome = "interrupted: stopped by Ctrl-C"
        raise
    except train.Diverged as exc:
        outcome = f"diverged: {exc}"
        raise
    except Exception as exc:
        outcome = f"error: {type(exc).__name__}: {exc}"
        raise
    finally:
        record_outcome(trial, records, time.perf_counter() - start, save_dir, outcome)


def record_outcome(trial, records, seconds, save_dir, outcome):
    """Store what the trial did as user attributes, and print one line about it."""
    attrs = {"seconds": round(seconds, 2), "epochs_run": len(records)}
    if records:
        best = max(records, key=lambda r: r["val_acc"])
        attrs.update(best_val_acc=best["val_acc"], best_epoch=best["epoch"],
                     train_loss=records[-1]["train_loss"], val_loss=records[-1]["val_loss"])
    checkpoint = os.path.join(save_dir, "best.npy")
    if os.path.exists(checkpoint):
        attrs["checkpoint"] = os.path.abspath(checkpoint)
    if outcome not in ("done", "pruned"):
        attrs["failure"] = outcome
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    state = {"done": "complete", "pruned": "pruned"}.get(outcome, "failed")
    acc = f"val acc {attrs['best_val_acc']:.4f}, " if records else ""
    params = " ".join(f"{k}={_fmt(v)}" for k, v in trial.params.items())
    why = f"  ({outcome})" if state == "failed" else ""
    print(f"trial {trial.number:3d} {state:<8} {acc}{len(records)} epoch(s), {seconds:.0f} s  "
          f"{params}{why}", flush=True)


def blas_threads(workers):
    """BLAS threads per worker so that workers x threads <= cores (or the user's cap)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // workers)
    for name in BLAS_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            threads = min(threads, int(value))
    return threads


_stopping = False  # set by the first Ctrl-C: start no new trial


def _on_interrupt(signum, frame):
    """Ctrl-C: raise KeyboardInterrupt once, and remember it, since Python can drop the
    exception (e.g. inside a weakref callback) and a worker must still stop."""
    global _stopping
    if not _stopping:
        _stopping = True
        raise KeyboardInterrupt


def catch_interrupts():
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:  # not when ignored
        signal.signal(signal.SIGINT, _on_interrupt)


def worker_main(plan, worker):
    """Entry point of a spawned worker: load the data once, then run trials."""
    catch_interrupts()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        job = Job(plan, worker)
        job.data = data_loader.load_data(plan["data_dir"], progress=False)
        job.run()
    except cli.Error as exc:
        print(f"error: worker {worker}: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


def run_workers(plan, n):
    """Run `n` worker processes against the study; the number that failed."""
    threads = blas_threads(n)
    for name in BLAS_VARIABLES:  # spawned children read these before importing NumPy
        os.environ[name] = str(threads)
    context = multiprocessing.get_context("spawn")
    plan = {**plan, "parent_pid": os.getpid()}
    processes = [context.Process(target=worker_main, args=(plan, i), name=f"worker-{i}")
                 for i in range(n)]
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt:  # pass it on, and let the workers record their trials
        for p in processes:
            if p.is_alive():
                os.kill(p.pid, signal.SIGINT)
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
        raise
    return sum(p.exitcode not in (0, 130) for p in processes)


# --- outputs ----------------------------------------------------------------------------------


def trial_rows(study):
    """One dict per trial: state, parameters, best validation accuracy, losses, time."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({
            "number": t.number, "state": t.state.name, "best_val_acc": a.get("best_val_acc"),
            "best_epoch": a.get("best_epoch"), "epochs_run": a.get("epochs_run"),
            "final_train_loss": a.get("train_loss"), "final_val_loss": a.get("val_loss"),
            "seconds": a.get("seconds"), "params": trial_params(t), "reason": failure(t),
            "checkpoint": a.get("checkpoint"), "host": a.get("worker", {}).get("host"),
            "started": t.datetime_start and t.datetime_start.isoformat(timespec="seconds"),
            "finished": t.datetime_complete and t.datetime_complete.isoformat(timespec="seconds"),
            "retry_of": a.get("retry_of"), "config": a.get("config"),
        })
    return rows


def write_tables(study, plan):
    """trials.json and trials.csv in the output folder, rewritten whole (atomically)."""
    rows, out = trial_rows(study), plan["out_dir"]
    cli.write_json(os.path.join(out, FILES["json"]),
                   {"study": plan["study_name"], "storage": shown(plan["storage"]),
                    "sampler": plan["sampler"], "space": plan["space"], "trials": rows})
    keys = list(plan["space"])
    columns = ["number", "state", "best_val_acc", "best_epoch", "epochs_run",
               "final_train_loss", "final_val_loss", "seconds", *keys, "reason", "checkpoint",
               "host", "started", "finished"]
    with cli.atomic_write(os.path.join(out, FILES["csv"]), "w") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: row["params"].get(k) for k in keys}})
    return rows


def best_trial(study):
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def write_best(study, plan):
    """best_result.json in the report's format, and best.npy copied from the best trial."""
    best = best_trial(study)
    if best is None:
        return None
    config = best.user_attrs.get("config", {})
    source = best.user_attrs.get("checkpoint")
    target = os.path.join(plan["out_dir"], FILES["model"])
    if source and os.path.exists(source):
        with open(source, "rb") as src, cli.atomic_write(target) as dst:
            shutil.copyfileobj(src, dst)
    else:  # another machine ran it: its checkpoint is there
        host = best.user_attrs.get("worker", {}).get("host")
        print(f"note: the best trial's checkpoint {source} is on host {host}, not here")
        target = None
    result = {
        "best_params": {"learning_rate": config.get("lr"), "hidden_size": config.get("hidden_size"),
                        "reg_lambda": config.get("reg"), "activation": config.get("activation"),
                        "lr_decay": config.get("lr_decay")},
        "best_val_acc": best.value, "trial": best.number, "params": trial_params(best),
        "best_epoch": best.user_attrs.get("best_epoch"), "checkpoint": target,
        "trial_checkpoint": source, "study": plan["study_name"], "sampler": plan["sampler"],
        "config": config,
    }
    cli.write_json(os.path.join(plan["out_dir"], FILES["best"]), result)
    return result


def top_table(study, plan):
    """The top-k complete trials as aligned text lines."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(complete, key=lambda t: (-t.value, t.number))[:plan["top_k"]]
    keys = list(plan["space"])
    header = ["rank", "trial", "val_acc", "epochs", "seconds", *keys]
    rows = [[str(i), str(t.number), f"{t.value:.4f}", str(t.user_attrs.get("epochs_run", "")),
             f"{t.user_attrs.get('seconds', 0):.0f}", *(_fmt(t.params.get(k)) for k in keys)]
            for i, t in enumerate(ranked, 1)]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [header, *rows]]


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def summary(study):
    """Counts of trials per state, e.g. '6 complete, 1 pruned, 1 failed'."""
    trials = study.get_trials(deepcopy=False)
    counts = {s: sum(t.state == s for t in trials) for s in TrialState}
    cut = sum(interrupted(t) for t in trials)
    parts = [f"{counts[TrialState.COMPLETE]} complete", f"{counts[TrialState.PRUNED]} pruned",
             f"{counts[TrialState.FAIL] - cut} failed"]
    for label, n in (("interrupted (rerun)", cut), ("running", counts[TrialState.RUNNING]),
                     ("queued", counts[TrialState.WAITING])):
        if n:
            parts.append(f"{n} {label}")
    return ", ".join(parts)


# --- plots (matplotlib, drawn on Figure objects: no display needed) --------------------------


def plot_history(study, path):
    """Best validation accuracy of each trial, and the best so far."""
    from matplotlib.figure import Figure
    import utils
    trials = study.get_trials(deepcopy=False)
    done = [(t.number, t.value) for t in trials if t.state == TrialState.COMPLETE]
    pruned = [(t.number, t.value) for t in trials
              if t.state == TrialState.PRUNED and t.value is not None]
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    if done:
        ax.scatter(*zip(*done), label="complete", zorder=3)
        best = list(itertools.accumulate((v for _, v in done), max))
        last = trials[-1].number  # the line runs on to the last trial, whatever its state
        ax.step([n for n, _ in done] + [last], best + best[-1:], where="post",
                color="tab:red", label="best so far")
    if pruned:
        ax.scatter(*zip(*pruned), marker="x", color="grey", label="pruned (last epoch)")
    ax.set(xlabel="trial", ylabel="validation accuracy", title="Optimisation history")
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend()
    utils.save_figure(fig, path)


def plot_importance(study, path):
    """Optuna's parameter importances (PED-ANOVA) as bars; None when they cannot be told."""
    from matplotlib.figure import Figure
    import utils
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except Exception as exc:  # too few complete trials, or no parameter varies
        return f"{type(exc).__name__}: {exc}"
    if not importances:
        return "no parameter varies among the complete trials"
    names = list(importances)[::-1]
    fig = Figure(figsize=(6, 0.5 * len(names) + 1.5), layout="constrained")
    ax = fig.subplots()
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance for validation accuracy", title="Parameter importance")
    utils.save_figure(fig, path)
    return None


def plot_lr_reg(study, path):
    """Best validation accuracy over learning rate x regularisation (best per pair)."""
    from matplotlib.figure import Figure
    import utils
    cells = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        c = t.user_attrs.get("config", {})
        if "lr" in c and "reg" in c:
            key = (c["lr"], c["reg"])
            cells[key] = max(cells.get(key, -1.0), t.value)
    if not cells:
        return
    (lrs, regs), accs = zip(*cells), list(cells.values())
    fig = Figure(figsize=(6.5, 4.8), layout="constrained")
    ax = fig.subplots()
    points = ax.scatter(lrs, regs, c=accs, s=300, cmap="viridis", edgecolors="black")
    for x, y, a in zip(lrs, regs, accs):
        ax.annotate(f"{a:.3f}", (x, y), textcoords="offset points", xytext=(0, 12),
                    ha="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log" if min(regs) > 0 else "symlog", **({} if min(regs) > 0
                                                           else {"linthresh": 1e-5}))
    ax.set(xlabel="learning rate", ylabel="L2 regularisation (reg)",
           title="Best validation accuracy per learning rate x reg")
    fig.colorbar(points, ax=ax, label="validation accuracy")
    utils.save_figure(fig, path)


def report(study, plan):
    """Write every output file and print the top-k table and where things are."""
    out = plan["out_dir"]
    write_tables(study, plan)
    best = write_best(study, plan)
    plot_history(study, os.path.join(out, FILES["history"]))
    why_not = plot_importance(study, os.path.join(out, FILES["importance"]))
    plot_lr_reg(study, os.path.join(out, FILES["lr_reg"]))
    print(f"\nStudy {plan['study_name']!r}: {summary(study)}")
    if best is None:
        print("No trial has completed yet.")
        return
    table = top_table(study, plan)
    print(f"Top {len(table) - 1} by validation accuracy:")
    print("\n".join(table))
    if why_not:
        print(f"(parameter importance not drawn: {why_not})")
    print(f"\nBest: trial {best['trial']}, validation accuracy {best['best_val_acc']:.4f}")
    print(f"Saved in {out}: {', '.join(FILES.values())}")
    if best["checkpoint"]:
        print(f"Evaluate it: python test.py --model {best['checkpoint']}")


# --- command line -----------------------------------------------------------------------------


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def _count(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _study_name(text):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError("use letters, digits, '.', '_' and '-'")
    return text


def build_parser():
    parser = cli.Parser(
        description="Hyperparameter search over train.py's options with Optuna. Rerunning "
                    "the same command resumes the search.",
        epilog="--space items: KEY=V1,V2,... lists values (a grid dimension); KEY=LO:HI or "
               "KEY=LO:HI:log is a range (random and tpe only). KEY is any training option "
               "below (dashes or underscores; learning_rate and reg_lambda also work). "
               "hidden_size values: 512 (both layers) or 512x256. Default space: "
               f"{' '.join(DEFAULT_SPACE)}, plus {DEFAULT_DECAYS} with --lr-schedule step.")
    s = parser.add_argument_group("search")
    s.add_argument("--space", nargs="+", action="extend", metavar="KEY=VALUES",
                   help="searched options (default: the space in the epilog)")
    s.add_argument("--space-file", metavar="FILE",
                   help='JSON object, e.g. {"lr": [0.01, 0.05], "reg": {"low": 1e-4, "high": '
                        '1e-2, "log": true}}; --space items override its keys')
    s.add_argument("--sampler", choices=SAMPLERS, default="grid",
                   help="grid: each combination exactly once; random; tpe (default: grid)")
    s.add_argument("--n-trials", type=_positive(int), metavar="N",
                   help="trials in the whole study, counting those of earlier runs (default: "
                        "the whole grid; 20 for random and tpe unless --timeout is given)")
    s.add_argument("--timeout", type=_positive(float), metavar="SECONDS",
                   help="start no trial after this many seconds of this run")
    s.add_argument("--pruner", choices=PRUNERS, default="none",
                   help="stop poor trials early on their per-epoch validation accuracy: "
                        "median or successive halving (default: none)")
    s.add_argument("--prune-startup", type=_count, default=5, metavar="N",
                   help="median: complete trials before any pruning (default: 5)")
    s.add_argument("--prune-warmup", type=_count, default=1, metavar="EPOCHS",
                   help="epochs every trial runs before it may be pruned (default: 1)")
    s.add_argument("--workers", type=_positive(int), default=1, metavar="N",
                   help="local worker processes; each gets cores/N BLAS threads (default: 1)")
    s.add_argument("--storage", metavar="URL_OR_FILE",
                   help="an Optuna RDB URL (postgresql+psycopg2://user@host/db: every machine "
                        "running the same command shares the work) or a journal file "
                        "(default: OUT_DIR/study.journal)")
    s.add_argument("--study-name", type=_study_name, default="search",
                   help="the study to create or resume (default: search)")
    s.add_argument("--out-dir", metavar="DIR",
                   help="trials and results (default: results/STUDY_NAME)")
    s.add_argument("--top-k", type=_positive(int), default=10, metavar="K",
                   help="rows of the printed table (default: 10)")
    s.add_argument("--sampler-seed", type=int, metavar="N",
                   help="seed of the random and tpe samplers (worker i uses N+i; default: none)")
    s.add_argument("--preset", choices=sorted(cfg.PRESETS), default=DEFAULT_PRESET,
                   help=f"training recipe the options below change (default: {DEFAULT_PRESET})")
    preset = ", ".join(f"{k}={v}" for k, v in cfg.PRESETS[DEFAULT_PRESET].items())
    t = parser.add_argument_group(
        "training options, the same for every trial",
        f"The defaults shown are config.py's; the default --preset {DEFAULT_PRESET} changes "
        f"them to {preset}.")
    cli.add_config_options(t, TRAIN_OPTIONS, cfg.HELP,
                           {**cfg.CHOICES, "activation": sorted(model.ACTIVATIONS)})
    parser.formatter_class = argparse.HelpFormatter  # the defaults are in the help texts
    return parser


def check_fits(plan, n_images):
    """Refuse a search whose largest --val-size and --batch-size the data cannot fill."""
    config = dict(plan["base"])
    for key in ("val_size", "batch_size"):
        p = plan["space"].get(key)
        if p:
            config[key] = max(p["choices"]) if "choices" in p else int(p["high"])
    train.check_fits(config, n_images)


def main(argv=None):
    args = build_parser().parse_args(argv)
    catch_interrupts()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        plan = make_plan(args)
    except cli.Error as exc:  # a bad option value: a usage error, exit status 2
        raise cli.UsageError(str(exc)) from exc
    # Before the study is written: a download happens here once, and every check is done.
    data = data_loader.load_data(plan["data_dir"])
    check_fits(plan, len(data[0]))
    cli.writable_folder(plan["out_dir"])
    job = Job(plan)
    job.lock.acquire()
    try:
        has_work = prepare(job.study, plan)
    finally:
        job.lock.release()
    print(status_line(job.study, plan), flush=True)
    failed_workers = 0
    try:
        if has_work:
            if plan["workers"] == 1:
                job.data = data
                job.run()
            else:
                del data
                failed_workers = run_workers(plan, plan["workers"])
    finally:  # also after Ctrl-C: the tables and the best so far
        report(job.study, plan)
    if failed_workers:
        raise cli.Error(f"{failed_workers} of {plan['workers']} workers stopped on an error "
                        "(see above); rerun the command to finish the search")
    return 0


def status_line(study, plan):
    """What the study holds and what this run will do, in one line."""
    trials = study.get_trials(deepcopy=False)
    finished = counted([t for t in trials if t.state.is_finished()])
    budget = plan["n_trials"] - counted(trials) if plan["n_trials"] else None
    if plan["sampler"] == "grid":
        what = f"a grid of {len(grid(plan['space']))} combinations"
        queued = sum(t.state == TrialState.WAITING for t in trials)
        todo = queued if budget is None else min(queued, budget)
    else:
        what = f"a {plan['sampler']} search"
        todo = "trials until --timeout" if budget is None else budget
    workers = plan["workers"]
    threads = f" with {blas_threads(workers)} BLAS thread(s) each" if workers > 1 else ""
    return (f"Study {plan['study_name']!r} in {shown(plan['storage'])}: {what}; {finished} "
            f"trial(s) finished before; {todo} to run on {workers} worker(s){threads}")


if __name__ == "__main__":
    cli.run(main)
