"""What a search leaves in its --out-dir: trials.json and trials.csv, best_result.json, the best
trial's best.npy and plots, and the table it prints at the end.

    report(study, plan)      # after any run, also one stopped by a signal
"""
import collections
import csv
import json
import os
import re
import shutil

from optuna.trial import TrialState

import checkpoint
import cli
import files
import limits
import utils
from utils import fmt
from study_storage import STATES, failure, interrupted, trial_params, where

FILES = {"json": "trials.json", "csv": "trials.csv", "best": "best_result.json",
         "model": "best.npy", "history": "optimization_history.png",
         "importance": "param_importance.png"}  # and val_acc_<a>_<b>.png
WRITTEN = [*FILES.values(), "val_acc_*.png"]  # every name it writes, as patterns



def trial_folder(plan, trial):
    """A trial's folder: its own, or that of the interrupted trial it continues."""
    number = int(trial.user_attrs.get("folder", trial.number))
    return os.path.join(plan["out_dir"], f"trial_{number}")


COLUMNS = ["number", "state", "best_val_acc", "best_epoch", "epochs_run", "final_train_loss",
           "final_val_loss", "seconds", "reason", "folder", "host", "started", "finished"]


def write_tables(study, plan):
    """trials.json (which also marks the folder as this study's) and trials.csv (a column per
    searched option), each rewritten whole and atomically."""
    rows, when = [], lambda t: t and t.isoformat(timespec="seconds")
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        rows.append({"number": t.number, "state": t.state.name,
                     "best_val_acc": a.get("best_val_acc"), "best_epoch": a.get("best_epoch"),
                     "epochs_run": a.get("epochs_run"), "final_train_loss": a.get("train_loss"),
                     "final_val_loss": a.get("val_loss"), "seconds": a.get("seconds"),
                     "params": trial_params(t), "reason": failure(t),
                     "folder": trial_folder(plan, t), "host": a.get("worker", {}).get("host"),
                     "started": when(t.datetime_start), "finished": when(t.datetime_complete),
                     "retry_of": a.get("retry_of"), "config": a.get("config")})
    files.write_json(os.path.join(plan["out_dir"], FILES["json"]),
                     {"study": plan["study_name"], "storage": where(plan["storage"]),
                      "sampler": plan["sampler"], "space": plan["space"], "trials": rows})
    columns = [*COLUMNS[:8], *plan["space"], *COLUMNS[8:]]
    with files.atomic_write(os.path.join(plan["out_dir"], FILES["csv"]), "w") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, **row["params"]} for row in rows)


# trials.json begins with the study and the storage it belongs to (see write_tables).
_HEAD = re.compile(r'\s*\{\s*"study":\s*("(?:[^"\\]|\\.)*"),\s*"storage":\s*("(?:[^"\\]|\\.)*")')


def check_out_dir(plan):
    """Refuse an --out-dir whose trials.json belongs to another study: folders would mix. Only
    its head is read, where it names them: a FIFO, a huge or a deeply nested file is no
    matter."""
    try:
        with files.open_regular(os.path.join(plan["out_dir"], FILES["json"])) as f:
            found = _HEAD.match(f.read(limits.TRIALS_HEAD_BYTES).decode("utf-8", "replace"))
        held = (json.loads(found[1]), where(json.loads(found[2]))) if found else None
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        held = None
    held = held or ("unknown (its trials.json cannot be read)", "?")
    if held != (plan["study_name"], where(plan["storage"])):
        raise cli.Error(f"--out-dir {plan['out_dir']} holds study {held[0]!r} in {held[1]}; "
                        "give this study another --out-dir")


def write_best(best, plan):
    """best_result.json in the report's format, and best.npy: the best trial's checkpoint,
    taken only from its folder in --out-dir and only once it loads as a checkpoint."""
    config = best.user_attrs.get("config", {})
    source = os.path.join(trial_folder(plan, best), "best.npy")
    target = os.path.join(plan["out_dir"], FILES["model"])
    try:
        checkpoint.load_checkpoint(source)
        with files.open_regular(source) as src, files.atomic_write(target) as dst:
            shutil.copyfileobj(src, dst)
    except (OSError, cli.Error) as exc:
        print(f"note: no {FILES['model']} here: {cli.one_line(exc)} (another machine may "
              "have run the best trial)")
        target = None
    report_params = {"learning_rate": config.get("lr"), "hidden_size": config.get("hidden_size"),
                     "reg_lambda": config.get("reg"), "activation": config.get("activation")}
    if config.get("lr_schedule") == "step":  # the only schedule lr_decay acts in
        report_params["lr_decay"] = config.get("lr_decay")
    result = {
        "best_params": report_params,
        "best_val_acc": best.value, "trial": best.number, "params": trial_params(best),
        "best_epoch": best.user_attrs.get("best_epoch"), "checkpoint": target,
        "trial_checkpoint": source, "study": plan["study_name"], "sampler": plan["sampler"],
        "config": config,
    }
    files.write_json(os.path.join(plan["out_dir"], FILES["best"]), result)
    return result


def summary(study):
    """Counts of trials per state, e.g. '6 complete, 1 pruned, 1 failed, 1 running'."""
    n = collections.Counter("interrupted (rerun)" if interrupted(t) else STATES[t.state]
                            for t in study.get_trials(deepcopy=False))
    words = ["complete", "pruned", "failed", "interrupted (rerun)", "running", "queued"]
    return ", ".join(f"{n[w]} {w}" for w in words if n[w] or w in words[:3])


def report(study, plan):
    """Write every output file, then print the top-k table and where things are."""
    write_tables(study, plan)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ranked = sorted(complete, key=lambda t: (-t.value, t.number))  # of equals, the earlier
    best = write_best(ranked[0], plan) if ranked else None
    pair, why_not = utils.plot_search(study, plan["out_dir"], plan["space"], FILES)
    print(f"\nStudy {plan['study_name']!r}: {summary(study)}")
    if best is None:
        print("No trial has completed yet.")
        return
    keys = list(plan["space"])
    rows = [["rank", "trial", "val_acc", "epochs", "seconds", *keys]] + [
        [str(i), str(t.number), f"{t.value:.4f}", str(t.user_attrs.get("epochs_run", "")),
         f"{t.user_attrs.get('seconds', 0):.0f}", *(fmt(t.params.get(k)) for k in keys)]
        for i, t in enumerate(ranked[:plan["top_k"]], 1)]
    widths = [max(map(len, column)) for column in zip(*rows)]
    print(f"Top {len(rows) - 1} by validation accuracy:")
    for row in rows:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))
    if why_not:
        print(f"(parameter importance not drawn: {why_not})")
    print(f"\nBest: trial {best['trial']}, validation accuracy {best['best_val_acc']:.4f}")
    names = [name for name in [*FILES.values(), pair]
             if name and os.path.exists(os.path.join(plan["out_dir"], name))]
    print(f"Saved in {plan['out_dir']}: {', '.join(names)}")
    if best["checkpoint"]:
        print(f"Evaluate it: python test.py --model {best['checkpoint']}")
    print(f"Browse the study: optuna-dashboard {where(plan['storage'])}")
