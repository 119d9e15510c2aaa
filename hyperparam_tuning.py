"""Search train.py's options with Optuna: a grid (each combination once), random or TPE.

    python hyperparam_tuning.py                       # the default grid: lr x hidden x reg x act
    python hyperparam_tuning.py --sampler tpe --space lr=1e-3:0.1:log reg=1e-5:1e-2:log \\
        --n-trials 30 --pruner median --workers 2
    python hyperparam_tuning.py --storage postgresql+psycopg2://user@host/db   # on each machine

Each trial is one train.train() run in <out-dir>/trial_<n>/; the same command run again
resumes the study. Results in <out-dir>: trials.json/.csv, best_result.json, best.npy, plots.

How workers share the study (claim lock, tokens, liveness) is study_storage.py's.
"""
import argparse
import contextlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time

import numpy as np
import optuna
from optuna.trial import TrialState

import cli
import config as cfg
import data_loader
import files
import limits
import model
import search_report
import search_space
import study_storage
import train
from study_storage import STATES, counted, interrupted, trial_params, where

DEFAULT_PRESET = "fast"
# Close to the report's grid (learning rate x hidden size x regularisation x activation x
# decay): 16 short trials (--help says how long); lr_decay joins when the schedule is `step`.
DEFAULT_SPACE = ["lr=0.01,0.05", "hidden_size=256,512", "reg=1e-4,1e-3", "activation=relu,tanh"]
DEFAULT_DECAYS = "lr_decay=0.9,0.95"
TRAIN_OPTIONS = {k: v for k, v in cfg.DEFAULT_CONFIG.items() if k != "save_dir"}
BLAS_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
MAX_WORKERS = 4 * CORES
# --- the plan: everything a worker needs, checked before any work starts ---------------------


def make_plan(args):
    """Check the command line and return the search as a plain (picklable) dict."""
    fixed = cli.overrides(args, TRAIN_OPTIONS)
    base = cfg.make_config(args.preset, **fixed)
    space = search_space.load_space_file(args.space_file) if args.space_file else {}
    space.update(search_space.parse_space(args.space or []))
    if not space:
        default = DEFAULT_SPACE + ([DEFAULT_DECAYS] if base["lr_schedule"] == "step" else [])
        space = {k: p for k, p in search_space.parse_space(default).items() if k not in fixed}
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
    if args.sampler == "grid" and search_space.grid_size(space) > limits.GRID_POINTS:
        raise cli.Error(f"--sampler grid: the space holds {search_space.grid_size(space):,} "
                        f"combinations, more than the {limits.GRID_POINTS:,} a grid may run; "
                        "list fewer values, or use --sampler random or tpe")
    for key, p in space.items():  # each choice and both ends of each range make a valid config
        for value in p.get("choices", [p.get("low"), p.get("high")]):
            try:
                trial = search_space.config_values({key: value})
                config = cfg.make_config(args.preset, **fixed, **trial)
                model.get_activation(config["activation"])
            except cli.Error as exc:
                raise cli.Error(f"--space {key}={value}: {exc}") from None
    for config in largest_networks(args.preset, fixed, space):
        try:
            train.check_network(config)
        except cli.Error as exc:
            raise cli.Error(f"--space: {exc}") from None
    if "lr_decay" in space and base["lr_schedule"] != "step":
        print("note: lr_decay only acts with --lr-schedule step", file=sys.stderr)
    out_dir = args.out_dir or os.path.join("results", args.study_name)
    storage = args.storage or os.path.join(out_dir, "study.journal")
    scheme = storage.split("://")[0].split("+")[0] if "://" in storage else None
    if scheme not in (None, "postgresql"):
        raise cli.Error(f"--storage takes a journal file or a postgresql:// URL, not {scheme}://"
                        ": other databases can hand one trial to two workers")
    if not scheme and os.path.exists(storage) and not os.path.isfile(storage):
        raise cli.Error(f"--storage {storage} is not a regular file")
    n_trials = args.n_trials or (None if args.sampler == "grid" or args.timeout else 20)
    return {**vars(args), "out_dir": out_dir, "storage": storage, "space": space,
            "fixed": fixed, "base": base, "n_trials": n_trials,
            "deadline": time.time() + args.timeout if args.timeout else None,
            "data_dir": base["data_dir"], "parent_pid": None, "out_dir_identity": None}


def largest_networks(preset, fixed, space):
    """A configuration for each hidden size the search may train, with the most inputs and the
    widest dtype it allows: no trial's network is larger than one of these."""
    def values(key):
        p = space.get(key)
        if p is None:
            return [cfg.make_config(preset, **fixed)[key]]
        found = p["choices"] if "choices" in p else [p["low"], p["high"]]
        return [search_space.config_values({key: v})[key] for v in found]

    whiten = max(values("whiten"), key=lambda w: w or data_loader.PIXELS)  # 0: every pixel
    dtype = max(values("dtype"), key=lambda d: np.dtype(d).itemsize)
    for hidden in values("hidden_size"):
        yield cfg.make_config(preset, **{**fixed, "hidden_size": hidden, "whiten": whiten,
                                         "dtype": dtype})


def make_sampler(plan, worker, n_trials):
    """A sampler seeded from (--sampler-seed, worker, trials so far): no repeats on resume."""
    seed = plan["sampler_seed"]
    if seed is not None:
        seed = int(np.random.SeedSequence([seed, worker, n_trials]).generate_state(1)[0])
    if plan["sampler"] == "tpe":
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=seed)  # grid trials are queued: none consulted


def open_study(plan, storage):
    """Create the study or load it, refusing one made by a different search (the budget and
    the paths may change between runs)."""
    warmup = plan["prune_warmup"]
    pruner = {"none": optuna.pruners.NopPruner(),
              "median": optuna.pruners.MedianPruner(n_startup_trials=plan["prune_startup"],
                                                    n_warmup_steps=warmup),
              "halving": optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, warmup)),
              }[plan["pruner"]]
    study = optuna.create_study(storage=storage, study_name=plan["study_name"],
                                direction="maximize", load_if_exists=True, pruner=pruner)
    base = {k: v for k, v in plan["base"].items() if k not in cfg.LOCAL_KEYS}
    signature = json.loads(json.dumps({"sampler": plan["sampler"], "space": plan["space"],
                                       "config": base}))  # as stored: lists, not tuples
    stored = study.user_attrs.get("search")
    if stored is None:
        study.set_user_attr("search", signature)
    elif stored != signature:
        changed = [k for k in ("sampler", "space") if stored.get(k) != signature[k]]
        changed += [f"{k} {stored['config'].get(k)!r} -> {v!r}"
                    for k, v in signature["config"].items() if stored["config"].get(k) != v]
        raise cli.Error(f"study {plan['study_name']!r} in {where(plan['storage'])} holds a "
                        f"different search (changed: {', '.join(changed)}); rerun with the same "
                        "options, or pick a new --study-name")
    return study


# --- workers: which trials are done, which are missing, who runs what -------------------------


def _key(params):
    return tuple(sorted(params.items()))


def to_run(plan, trials):
    """How many trials are left: the queued grid points, or the rest of a random or tpe
    search, within the budget; None for trials until --timeout."""
    budget = max(0, plan["n_trials"] - counted(trials)) if plan["n_trials"] else None
    if plan["sampler"] != "grid":
        return budget
    queued = sum(t.state == TrialState.WAITING for t in trials)
    return queued if budget is None else min(queued, budget)


class Worker:
    """One process's share of the search: its seat in the shared study, and the data."""

    def __init__(self, plan, index=0, data=None):
        self.plan, self.index, self.data = plan, index, data
        self.shared = study_storage.SharedStudy(plan["storage"], plan["study_name"],
                                                lambda storage: open_study(plan, storage))
        self.study = self.shared.study

    def close(self):
        self.shared.close()

    @contextlib.contextmanager
    def claimed(self):
        """Hold the claim lock and bring the study up to date: with the trials of dead workers
        failed, queue a rerun (in its folder) of each interrupted trial whose point no other
        trial holds, and the grid points not taken. Yields whether work is left, and the
        trials."""
        study, plan = self.study, self.plan
        with self.shared.claim_lock():
            trials = study.get_trials(deepcopy=False)
            taken = {_key(trial_params(t)) for t in trials if not interrupted(t)}
            for t in reversed(trials):  # a point cut twice: its latest trial is rerun
                params = trial_params(t)
                whole = set(params) == set(plan["space"])  # not cut while they were drawn
                if interrupted(t) and whole and _key(params) not in taken:
                    study.enqueue_trial(params, user_attrs={
                        "retry_of": t.number, "folder": t.user_attrs.get("folder", t.number)})
                    taken.add(_key(params))
            if plan["sampler"] == "grid":
                for point in search_space.grid(plan["space"]):
                    if _key(point) not in taken:
                        study.enqueue_trial(point)
            trials = study.get_trials(deepcopy=False)
            yield to_run(plan, trials) != 0, trials

    def has_work(self):
        with self.claimed() as (has_work, _):
            return has_work

    def claim(self):
        """The next trial, its parameters drawn and this worker's token in it under the claim
        lock; None when no work is left."""
        deadline = self.plan["deadline"]
        if cli.stop_signal or (deadline and time.time() >= deadline):
            return None
        files.check_folder(self.plan["out_dir"])  # else a trial's folder would make it again
        with self.claimed() as (has_work, trials):
            if not has_work:
                return None
            self.study.sampler = make_sampler(self.plan, self.index, len(trials))
            trial = self.study.ask(search_space.distributions(self.plan["space"]))
            self.shared.sign(trial)
            return trial

    def run(self):
        """Run trials until the budget is spent, the grid is done or time is up."""
        while (trial := self.claim()) is not None:
            self.run_trial(trial)
            search_report.write_tables(self.study, self.plan)

    def run_trial(self, trial):
        """Train one trial, tell how it ended and print one line. A signal or a failure of the
        machine (an OSError while writing) also stops the worker, and the trial runs again on
        the next run; a failure of the configuration (divergence, a bad value) is final. A
        trial that another worker took for dead and retired meanwhile is only reported."""
        plan, new, start = self.plan, [], time.perf_counter()
        state, value, why, stop, result = TrialState.FAIL, None, "", None, {}

        def on_epoch(record):
            new.append(record)
            trial.report(record["val_acc"], record["epoch"])
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            save_dir = search_report.trial_folder(plan, trial)
            params = search_space.config_values(trial.params)
            config = cfg.make_config(plan["preset"], **plan["fixed"], **params, save_dir=save_dir)
            trial.set_user_attr("config", config)
            resume = os.path.exists(os.path.join(save_dir, train.STATE_FILE))
            result = train.train(config, data=self.data, on_epoch=on_epoch, progress=False,
                                 resume=resume)
            if result["stopped"] == "interrupted":  # train.train keeps a signal to itself
                raise cli.Stopped(result["signal"])
            state, value = TrialState.COMPLETE, result["best_val_acc"]
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except KeyboardInterrupt as exc:
            why, stop = "interrupted: stopped by a signal", exc
        except train.Diverged as exc:
            why = f"diverged: {exc}"
        except Exception as exc:
            why = f"error: {type(exc).__name__}: {cli.one_line(exc)}"
            if any(isinstance(e, OSError) for e in (exc, exc.__cause__, exc.__context__)):
                why = f"interrupted: the machine failed: {cli.one_line(exc)}"
                stop = cli.Error(f"trial {trial.number} stopped: {cli.one_line(exc)}; fix this, "
                                 "then rerun the command: the trial will run again")
        history, seconds = result.get("history", new), time.perf_counter() - start
        attrs = {"seconds": round(seconds, 2), "epochs_run": len(history)}
        if history:
            best = max(history, key=lambda r: r["val_acc"])
            attrs.update(best_val_acc=best["val_acc"], best_epoch=best["epoch"],
                         train_loss=history[-1]["train_loss"], val_loss=history[-1]["val_loss"])
        if value is not None:  # averaged over the test-time views, as the trial is ranked
            attrs["best_val_acc"] = value
        if why:
            attrs["failure"] = why
        try:
            for key, v in attrs.items():
                trial.set_user_attr(key, v)
            told = self.study.tell(trial, value, state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            told = None
        if told is None or told.state != state:  # its point runs again
            print(f"note: trial {trial.number} was retired by another worker while it ran "
                  "(its worker was taken for dead); its result is dropped", flush=True)
        else:
            acc = f"val acc {attrs['best_val_acc']:.4f}, " if history else ""
            now = f" ({len(new)} now)" if len(new) != len(history) else ""
            params = " ".join(f"{k}={search_report.fmt(v)}" for k, v in trial.params.items())
            print(f"trial {trial.number:3d} {STATES[state]:<8} {acc}{len(history)} epoch(s){now}, "
                  f"{seconds:.0f} s  {params}" + (f"  ({why})" if why else ""), flush=True)
        if stop:
            raise stop


def blas_threads(workers):
    """BLAS threads per worker so that workers x threads <= cores (or the user's cap)."""
    threads = max(1, CORES // workers)
    for name in BLAS_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            threads = min(threads, int(value))
    return threads


catch_interrupts = cli.stop_on_signals  # a name the tests can stub


def worker_main(plan, index):
    """A spawned worker: load the data once, then run trials."""
    catch_interrupts(plan["parent_pid"])
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        with files.held_elsewhere(plan["out_dir"], plan["out_dir_identity"]):
            worker = Worker(plan, index, data_loader.load_data(plan["data_dir"], progress=False))
            try:
                worker.run()
            finally:
                worker.close()
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:
        what = cli.one_line(exc) if isinstance(exc, cli.Error) else f"{type(exc).__name__}: {exc}"
        print(f"error: worker {index}: {what}", file=sys.stderr, flush=True)
        sys.exit(1)


def run_workers(plan):
    """Run the worker processes, pass a signal on to them, and say which ones failed."""
    for name in BLAS_VARIABLES:  # spawned children read these before importing NumPy
        os.environ[name] = str(blas_threads(plan["workers"]))
    plan, spawn = {**plan, "parent_pid": os.getpid()}, multiprocessing.get_context("spawn")
    processes = [spawn.Process(target=worker_main, args=(plan, i)) for i in range(plan["workers"])]
    for p in processes:
        p.start()
    try:
        for p in processes:
            p.join()
    except KeyboardInterrupt as exc:  # the workers record their trials as interrupted
        for p in processes:
            if p.is_alive():
                os.kill(p.pid, getattr(exc, "signum", signal.SIGINT))
        for p in processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
        raise
    problems = [f"worker {i} " + (f"was killed by {signal.Signals(-p.exitcode).name}"
                                  if p.exitcode < 0 else "was stopped by a signal"
                                  if p.exitcode == 130 else "stopped on the error above")
                for i, p in enumerate(processes) if p.exitcode]  # 130: not the parent's signal
    if problems:
        raise cli.Error(f"{'; '.join(problems)}; its trial will run again: rerun the command "
                        "to finish the search")


def status_line(study, plan):
    """What the study holds and what this run will do, in one line."""
    trials, workers = study.get_trials(deepcopy=False), plan["workers"]
    finished = counted([t for t in trials if t.state.is_finished()])
    what = (f"a grid of {search_space.grid_size(plan['space'])} combinations"
            if plan["sampler"] == "grid" else f"a {plan['sampler']} search")
    todo = to_run(plan, trials)
    threads = f" with {blas_threads(workers)} BLAS thread(s) each" if workers > 1 else ""
    return (f"Study {plan['study_name']!r} in {where(plan['storage'])}: {what}; {finished} "
            f"trial(s) finished before; {'trials until --timeout' if todo is None else todo} "
            f"to run on {workers} worker(s){threads}")


# --- command line -----------------------------------------------------------------------------


def _study_name(text):
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError("use letters, digits, '.', '_' and '-'")
    return text


def build_parser():
    grid_size = len(search_space.grid(search_space.parse_space(DEFAULT_SPACE)))
    parser = cli.Parser(
        description="Hyperparameter search over train.py's options with Optuna. Rerunning "
                    "the same command resumes it; browse it with `optuna-dashboard "
                    "OUT_DIR/study.journal`.",
        epilog="--space items: KEY=V1,V2,... lists values (a grid dimension); KEY=LO:HI[:log] "
               "is a range (random and tpe only). KEY is any training option above "
               "(learning_rate and reg_lambda also work); hidden_size values: 512 or 512x256. "
               f"Default: {' '.join(DEFAULT_SPACE)} ({grid_size} trials of --preset "
               f"{DEFAULT_PRESET}, each {train.preset_time(DEFAULT_PRESET)}), plus "
               f"{DEFAULT_DECAYS} with --lr-schedule step.")
    s = parser.add_argument_group("search")
    s.add_argument("--space", nargs="+", action="extend", metavar="KEY=VALUES",
                   help="searched options (default: see below)")
    s.add_argument("--space-file", metavar="FILE", help='the same as JSON, e.g. {"lr": [0.01, '
                   '0.05], "reg": {"low": 1e-4, "high": 1e-2, "log": true}}; --space wins')
    s.add_argument("--sampler", choices=("grid", "random", "tpe"), default="grid",
                   help="grid runs each combination exactly once")
    s.add_argument("--n-trials", type=cli.bounded(int, 1), metavar="N",
                   help="trials in the whole study, over all runs (default: the grid; 20 for "
                        "random and tpe without --timeout)")
    s.add_argument("--timeout", type=cli.bounded(float, 1e-9), metavar="SECONDS",
                   help="start no trial after this many seconds of this run")
    s.add_argument("--pruner", choices=("none", "median", "halving"), default="none",
                   help="stop poor trials early on their per-epoch validation accuracy")
    s.add_argument("--prune-startup", type=cli.bounded(int, 0), default=5, metavar="N",
                   help="median: complete trials before any pruning")
    s.add_argument("--prune-warmup", type=cli.bounded(int, 0), default=1, metavar="EPOCHS",
                   help="epochs every trial runs before it may be pruned")
    s.add_argument("--workers", type=cli.bounded(int, 1, MAX_WORKERS), default=1, metavar="N",
                   help=f"local processes, at most {MAX_WORKERS}; each gets cores/N BLAS threads")
    s.add_argument("--storage", metavar="URL_OR_FILE",
                   help="a journal file (default: OUT_DIR/study.journal) or a postgresql:// URL "
                        "that machines running the same command share")
    s.add_argument("--study-name", type=_study_name, default="search",
                   help="the study to create or resume")
    s.add_argument("--out-dir", metavar="DIR",
                   help="trials and results of one study (default: results/STUDY_NAME)")
    s.add_argument("--top-k", type=cli.bounded(int, 1), default=10, metavar="K",
                   help="rows of the printed table")
    s.add_argument("--sampler-seed", type=cli.bounded(int, 0, 2**32 - 1), metavar="N",
                   help="seed of random and tpe (0 to 2**32-1): the same commands draw the "
                        "same points")
    s.add_argument("--preset", choices=sorted(cfg.PRESETS), default=DEFAULT_PRESET,
                   help="training recipe the options below change")
    t = parser.add_argument_group("training options, the same for every trial", "The defaults "
                                  f"shown are --preset {DEFAULT_PRESET}'s, which trials start "
                                  "from; another --preset brings its own (config.py).")
    trial_defaults = cfg.make_config(DEFAULT_PRESET)
    cli.add_config_options(t, {key: trial_defaults[key] for key in TRAIN_OPTIONS}, cfg.HELP,
                           {**cfg.CHOICES, "activation": sorted(model.ACTIVATIONS)}, cfg.ALIASES)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    catch_interrupts()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        plan = make_plan(args)
    except cli.Error as exc:  # a bad option value: a usage error, exit status 2
        raise cli.UsageError(str(exc)) from exc
    with cli.stopping_says("while reading the data, before any trial: nothing was written; "
                           "run the same command again"):
        data = data_loader.load_data(plan["data_dir"])  # a download happens here, once
    largest = {key: max(p["choices"]) if "choices" in p else int(p["high"])
               for key, p in plan["space"].items()
               if key in ("val_size", "batch_size", "whiten")}
    train.check_fits({**plan["base"], **largest}, len(data[0]))  # the data can fill them
    with files.folder_lock(plan["out_dir"], "--out-dir") as identity:
        plan["out_dir_identity"] = identity  # the workers hold the same folder
        search_report.check_out_dir(plan)
        files.remove_stale_temps(plan["out_dir"], search_report.WRITTEN)
        worker = Worker(plan, data=data if plan["workers"] == 1 else None)
        del data
        try:
            has_work = worker.has_work()
            search_report.write_tables(worker.study, plan)  # marks the folder as this study's
            print(status_line(worker.study, plan), flush=True)
            if has_work and plan["workers"] == 1:
                worker.run()
            elif has_work:
                run_workers(plan)
        except KeyboardInterrupt as exc:
            signum = getattr(exc, "signum", signal.SIGINT)
            print(f"error: stopped by {signal.Signals(signum).name}; rerun the same command to "
                  "continue", file=sys.stderr, flush=True)
            return 128 + signum
        finally:  # also after a signal: the tables and the best so far
            worker.close()
            files.check_folder(plan["out_dir"])  # a folder moved away gets no report
            search_report.report(worker.study, plan)
    return 0


if __name__ == "__main__":
    cli.run(main)
