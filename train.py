"""Train ThreeLayerNN on CIFAR-10 with minibatch SGD, keeping the best weights on validation.

    python train.py                      # the default recipe (config.py; --help: how long)
    python train.py --preset fast        # a short recipe, to try everything out
    python train.py --preset best        # the longer, more accurate recipe
    python train.py --lr 0.02 --hidden-size 512 256 --epochs 5
    python train.py --preset best --resume   # continue a stopped run from its last epoch

After every epoch the whole run (weights, velocities, random state, history, best so far)
is saved to <save-dir>/resume_state.npz, so `--resume` continues it exactly where it was.
"""
import contextlib
import math
import os
import resource
import shlex
import sys
import threading
import time

import numpy as np
from tqdm import tqdm

import checkpoint
import cli
import config as cfg
import data_loader
import files
import kernels
import model
import optim
from inference import evaluate, evaluate_flops, meta_views, views as test_views

BEST_FILE, HISTORY_FILE, CURVES_FILE = "best.npy", "history.json", "curves.png"
STATE_FILE = "resume_state.npz"
# What a signal before the first epoch has stopped, and what it leaves.
STARTING_UP = ("while starting up, before the first epoch: nothing was written; run the same "
               "command again")


class Diverged(cli.Error):
    """The loss turned NaN or infinite."""


def learning_rate(config, t):
    """The learning rate after `t` epochs (fractional): linear warmup, then the schedule."""
    peak, warmup, epochs = config["lr"], config["warmup_epochs"], config["epochs"]
    if t < warmup:
        return peak * t / warmup
    done = (t - warmup) / max(epochs - warmup, 1e-9)  # fraction of the post-warmup phase
    schedule = config["lr_schedule"]
    if schedule == "step":
        return peak * config["lr_decay"] ** math.floor((t - warmup) / config["lr_step"])
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * min(done, 1.0)))
    if schedule == "onecycle":
        return peak * max(1.0 - done, 0.0)
    return peak


@np.errstate(over="ignore", invalid="ignore")  # divergence is detected and reported below
def train_epoch(net, optimizer, images, labels, prep, config, epoch, rng, progress):
    """One pass of minibatch SGD over shuffled, augmented images; returns loss, accuracy, lr
    and the FLOPs of its matrix products.

    The loss returned is the plain cross-entropy of the batches as they were trained on,
    comparable to the validation loss: it leaves out label smoothing and L2.
    """
    batch_size = config["batch_size"]
    steps = len(images) // batch_size  # the last partial batch is dropped; reshuffling covers it
    order = rng.permutation(len(images))
    buffer = np.empty((batch_size, images.shape[1]), net.dtype)
    loss_sum = correct = 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{config['epochs']}", leave=False,
               disable=not progress, mininterval=0.5)
    for step in bar:
        idx = order[step * batch_size:(step + 1) * batch_size]
        x, yb, mixup = data_loader.training_batch(images, labels, idx, rng, prep, config,
                                                  net.dtype, out=buffer)
        lr = learning_rate(config, epoch - 1 + step / steps)
        log_probs, cache = net.forward_pass(x, rng if config["dropout"] else None)
        loss = model.cross_entropy(log_probs, yb, mixup=mixup)
        if not np.isfinite(loss):
            raise Diverged(f"the loss became {loss} at epoch {epoch}, step {step + 1} "
                           f"(lr {lr:.3g}); try a smaller --lr")
        loss_sum += loss
        # The share of the batch's (mixed) labels predicted: a right image counts its weight.
        predicted = log_probs.argmax(axis=1)
        correct += model.targets(yb, net.output_size, mixup=mixup)[np.arange(batch_size),
                                                                    predicted].sum()
        grads = net.backward_pass(log_probs, yb, cache, config["label_smoothing"], mixup)
        optimizer.step(net.params, grads, lr)  # consumes grads
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_sum / (step + 1):.3f}",
                            acc=f"{correct / ((step + 1) * batch_size):.3f}")
    flops = steps * batch_size * (net.flops(training=True) + data_loader.preprocess_flops(prep))
    return float(loss_sum / steps), float(correct / (steps * batch_size)), lr, flops


def network_arrays(config):
    """The arrays a checkpoint of `config`'s network holds, as {name: (shape, dtype)}."""
    sizes = [config["whiten"] or data_loader.PIXELS, *config["hidden_size"],
             data_loader.N_CLASSES]
    arrays = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:]), start=1):
        arrays[f"w{i}"], arrays[f"b{i}"] = ((fan_in, fan_out), config["dtype"]), \
            ((fan_out,), config["dtype"])
    if config["whiten"]:
        arrays["whitening"] = (data_loader.PIXELS, config["whiten"]), np.float32
    return arrays


def check_network(config):
    """Refuse, before any data is read, a network whose weights, velocities and gradients
    alone would not fit in the memory this process may take, or whose checkpoint its own
    loader would refuse (limits.py)."""
    h1, h2 = config["hidden_size"]
    arrays = network_arrays(config)
    weights = sum(math.prod(shape) for name, (shape, _) in arrays.items() if name != "whitening")
    need, have = 3 * weights * np.dtype(config["dtype"]).itemsize, memory_available()
    if have is not None and need > have:
        raise cli.UsageError(f"--hidden-size {h1} {h2} needs {need / 2**30:,.0f} GiB for its "
                             f"weights, velocities and gradients; this process may take "
                             f"{have / 2**30:,.1f} GiB")
    refused = checkpoint.too_large(arrays)
    if refused:
        raise cli.UsageError(f"--hidden-size {h1} {h2} with --dtype {config['dtype']} and "
                             f"--whiten {config['whiten']}: its checkpoint would not load "
                             f"({refused})")


CGROUP_ROOT, PROC_CGROUP = "/sys/fs/cgroup", "/proc/self/cgroup"


def memory_available():
    """The bytes this process may still take (None if unknown): the machine's memory, or less
    under an address-space limit (ulimit -v, less what is mapped now) or a cgroup's."""
    found = []
    with contextlib.suppress(AttributeError, ValueError, OSError):  # not a POSIX that tells
        found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY:
        found.append(soft - _status_kib("VmSize") * 1024)
    return min(found + _cgroup_limits(), default=None)


def _status_kib(field):
    """A field of /proc/self/status in KiB (0 where there is no /proc)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith(field + ":")).split()[1])
    return 0


def _cgroup_limits():
    """The memory limits of this process's cgroup and its parents (v2 memory.max, v1
    memory.limit_in_bytes); where the cgroup's own folder is not mounted, the mount's root."""
    found = []
    with contextlib.suppress(OSError):
        with open(PROC_CGROUP) as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
        for _, controllers, path in (line for line in lines if len(line) == 3):
            if controllers == "":
                root, name = CGROUP_ROOT, "memory.max"
            elif "memory" in controllers.split(","):
                root, name = os.path.join(CGROUP_ROOT, "memory"), "memory.limit_in_bytes"
            else:
                continue
            parts = path.strip("/").split("/") if path.strip("/") else []
            for depth in range(len(parts) + 1):
                with contextlib.suppress(OSError, ValueError):
                    with open(os.path.join(root, *parts[:depth], name)) as limit:
                        found.append(int(limit.read().strip()))  # "max" is no limit
    return found


def check_fits(config, n_images):
    """Refuse a validation split, a whitening or a batch that `n_images` training images
    cannot fill."""
    if not 0 < config["val_size"] < n_images:
        raise cli.UsageError(f"--val-size must be between 1 and {n_images - 1} (the number of "
                             f"training images minus one), got {config['val_size']}")
    data_loader.check_whitening(config["whiten"], n_images - config["val_size"])
    if config["batch_size"] > n_images - config["val_size"]:
        raise cli.UsageError(f"--batch-size {config['batch_size']} is larger than the "
                             f"{n_images - config['val_size']} training images")


def train(config, data=None, on_epoch=None, progress=True, evaluate_test=False, verbose=None,
          resume=False):
    """Train with `config`; write best.npy, history.json, curves.png and the run state to
    config['save_dir'], which this process holds until it returns (one run per folder).

    `resume` continues the run saved there from its last completed epoch, ending exactly as
    the uninterrupted run would; a finished run resumed just reports its result.
    `progress` shows a progress bar, `verbose` (by default the same) a line per epoch.
    `on_epoch(record)` runs after each epoch; an exception from it stops training (the best
    checkpoint and the state are already saved) and propagates. Ctrl-C, SIGTERM and SIGHUP
    stop cleanly: result["stopped"] is then "interrupted" and result["signal"] says which.
    """
    cfg.check(config)
    model.get_activation(config["activation"])
    check_network(config)
    verbose = progress if verbose is None else verbose
    say = cli.said(tqdm.write if progress else print) if verbose else (lambda message: None)
    loaded = data is None
    with cli.stopping_says(STARTING_UP):
        data = data or data_loader.load_data(config["data_dir"])
    check_fits(config, len(data[0]))
    with files.folder_lock(config["save_dir"]):
        files.remove_stale_temps(config["save_dir"], (BEST_FILE, HISTORY_FILE, CURVES_FILE,
                                                    STATE_FILE))
        if loaded:  # said once nothing can refuse the run before the whitening
            say(f"read CIFAR-10 from {config['data_dir']}: {len(data[0]):,} training and "
                f"{len(data[2]):,} test images")
        return _train(config, data, on_epoch, progress, evaluate_test, say, resume)


def warm_up_kernels(images, labels, config):
    """Load the fused kernels (Numba and its disk cache: about a second) on a side thread, so
    that the first batch finds them ready; started before the whitening, it overlaps it.
    Returns the thread. A failure is left to the first batch, which reports it."""
    def load():
        if not kernels.enabled():
            return
        with contextlib.suppress(Exception):
            dtype, idx = np.dtype(config["dtype"]), np.arange(2)
            prep = data_loader.Preprocessing(*data_loader.compute_stats(images[:2]))
            rng = np.random.default_rng(0)  # its own: the run's draws stay the same
            data_loader.training_batch(images, labels, idx, rng, prep, config, dtype)
            data_loader.preprocess(images[:2], prep, dtype)
            params = {"w1": np.zeros(2, dtype)}
            optimizer = optim.SGD(params, config["momentum"], config["nesterov"], config["reg"])
            optimizer.step(params, {"w1": np.zeros(2, dtype)}, 0.0)
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    return thread


def _train(config, data, on_epoch, progress, evaluate_test, say, resume):
    images, labels, test_images, test_labels = data
    path = {name: os.path.join(config["save_dir"], name)
            for name in (BEST_FILE, HISTORY_FILE, CURVES_FILE, STATE_FILE)}
    with cli.stopping_says(STARTING_UP):  # the whitening can take a while
        x_train, y_train, x_val, y_val = data_loader.split_validation(
            images, labels, config["val_size"], config["seed"])
        warm_up_kernels(x_train, y_train, config)
        if config["whiten"]:
            say(f"whitening: {config['whiten']} principal components from "
                f"{min(len(x_train), data_loader.WHITEN_SAMPLE):,} training images...")
        prep, prep_flops = data_loader.fit_preprocessing(x_train, config["whiten"],
                                                         config["whiten_eps"])
        inputs = x_train.shape[1] if prep.whitening is None else prep.whitening.shape[1]
        net = model.ThreeLayerNN(inputs, config["hidden_size"], len(data_loader.CLASS_NAMES),
                                 config["activation"], config["seed"], np.dtype(config["dtype"]),
                                 config["dropout"])
        optimizer = optim.SGD(net.params, config["momentum"], config["nesterov"], config["reg"])
        rng = np.random.default_rng(config["seed"])  # shuffling, augmentation and dropout
        run = checkpoint.new_run()
        run["flops"] = prep_flops
        if resume:
            run = checkpoint.load_state(path[STATE_FILE], config, net, optimizer, rng, prep)
            say(f"resuming {config['save_dir']} after epoch {run['epoch']} of "
                f"{config['epochs']}")
    first, signum = run["epoch"] + 1, None  # the first epoch this process runs
    try:
        while not run["stopped"] and run["epoch"] < config["epochs"]:
            if cli.stop_signal:  # caught by cli.stop_on_signals, its exception dropped
                raise cli.Stopped(cli.stop_signal)
            epoch = run["epoch"] + 1
            start = time.perf_counter()
            train_loss, train_acc, lr, flops = train_epoch(net, optimizer, x_train, y_train,
                                                           prep, config, epoch, rng, progress)
            val_loss, val_acc = evaluate(net, x_val, y_val, prep)  # one view: cheap
            run["flops"] += flops + evaluate_flops(net, prep, len(y_val))
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                      "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                      "tflop": run["flops"] / 1e12, "seconds": time.perf_counter() - start}
            improved = val_acc > run["best_acc"]
            with cli.signals_deferred():  # a signal now waits until run and files agree
                run["epoch"] = epoch
                run["history"].append(record)
                if improved:
                    run["best_acc"], run["best_epoch"] = val_acc, epoch
                if config["patience"] and epoch - run["best_epoch"] >= config["patience"]:
                    run["stopped"] = "early_stopping"
                if improved:
                    checkpoint.save_model(path[BEST_FILE], net, prep, config, epoch=epoch,
                               val_acc=val_acc)
                files.write_json(path[HISTORY_FILE], {"config": config, "epochs": run["history"],
                                                      "training_tflop": run["flops"] / 1e12})
                checkpoint.save_state(path[STATE_FILE], net, optimizer, rng, prep, config, run)
            say(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  val loss "
                f"{val_loss:.4f} acc {val_acc:.4f}  lr {lr:.4g}  {record['seconds']:.1f}s"
                + ("  *best" if improved else ""))
            if epoch == first < config["epochs"]:
                left = config["epochs"] - epoch
                say(f"at this pace the other {left} epochs take about "
                    f"{in_words(record['seconds'] * left)}")
            if on_epoch:
                on_epoch(record)
        if run["stopped"] == "early_stopping":
            say(f"no better validation accuracy for {config['patience']} epochs: stopped")
    except KeyboardInterrupt as exc:
        signum = getattr(exc, "signum", 2)
        if run["best_epoch"]:
            say(f"interrupted: the best checkpoint so far is kept in {path[BEST_FILE]}")
    if run["history"]:
        import utils  # matplotlib is loaded only when there is something to draw
        utils.plot_history(run["history"], path[CURVES_FILE])

    # The network chosen on one view of the validation split, scored on all the views its
    # predictions average (their cost is training compute too), and on the test set.
    views = test_views(config["flip_average"], config["test_shift"])
    val_acc, flops, test_acc, test_acc_single = run["best_acc"], run["flops"], None, None
    if run["best_epoch"] and (len(views) > 1 or evaluate_test):
        files.check_folder(config["save_dir"])  # its own best.npy, not another run's
        if not os.path.exists(path[BEST_FILE]):
            files.check_folder(config["save_dir"])  # the folder went, not just the file?
            raise cli.Error(f"{path[BEST_FILE]} was deleted while this run trained: its best "
                            f"network (epoch {run['best_epoch']}) is lost, and was not scored")
        best, meta = checkpoint.load_checkpoint(path[BEST_FILE])  # as test.py reads it
        if len(views) > 1:
            val_acc = evaluate(best, x_val, y_val, meta["prep"], meta_views(meta))[1]
            flops += evaluate_flops(best, meta["prep"], len(y_val), meta_views(meta))
            files.write_json(path[HISTORY_FILE], {
                "config": config, "epochs": run["history"], "training_tflop": flops / 1e12,
                "chosen": {"epoch": run["best_epoch"], "val_acc": val_acc, "views": len(views),
                           "val_acc_one_view": run["best_acc"]}})
        if evaluate_test:
            test_acc = evaluate(best, test_images, test_labels, meta["prep"],
                                meta_views(meta))[1]
            test_acc_single = evaluate(best, test_images, test_labels, meta["prep"])[1]
    return {"history": run["history"], "best_val_acc": val_acc,
            "best_val_acc_single": run["best_acc"], "best_epoch": run["best_epoch"],
            "epochs_run": len(run["history"]), "views": len(views),
            "stopped": "interrupted" if signum else run["stopped"] or "completed",
            "signal": signum, "checkpoint": path[BEST_FILE], "test_acc": test_acc,
            "test_acc_single": test_acc_single, "tflop": flops / 1e12}


def in_words(seconds):
    """A duration for people: 40 s, 12 min, 2.5 h."""
    return (f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400
            else f"{seconds / 3600:.2g} h")


def preset_time(name):
    """A preset's epochs and how long it takes at most on 2 cores, in words."""
    return (f"{cfg.make_config(name)['epochs']} epochs, up to "
            f"{in_words(60 * cfg.PRESET_MINUTES[name])} on 2 cores")


def main(argv):
    parser = cli.Parser(description="Train the three-layer network on CIFAR-10. Every "
                        "configuration key is an option; the defaults are config.py's.")
    parser.add_argument("--preset", default="default", choices=sorted(cfg.PRESETS),
                        help="a named recipe from config.py, applied before the other options: "
                        + ", ".join(f"{name} ({preset_time(name)})" for name in cfg.PRESETS))
    parser.add_argument("--resume", action="store_true",
                        help=f"continue the run in --save-dir from its last completed epoch "
                        f"({STATE_FILE}); give the same options as the run you continue")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (epoch lines are still printed)")
    cli.add_config_options(parser, cfg.DEFAULT_CONFIG, cfg.HELP,
                           {**cfg.CHOICES, "activation": sorted(model.ACTIVATIONS)}, cfg.ALIASES)
    args = parser.parse_args(argv)
    try:
        config = cfg.make_config(args.preset, **cli.overrides(args, cfg.DEFAULT_CONFIG))
    except cli.Error as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    result = train(config, progress=not args.no_progress, evaluate_test=True, verbose=True,
                   resume=args.resume)
    seconds = time.perf_counter() - start
    if not result["best_epoch"]:
        sys.stderr.write("stopped before the first epoch ended: nothing was saved\n")
        return 128 + (result["signal"] or 2)
    print(f"Best validation accuracy: {result['best_val_acc']:.4f} at epoch "
          f"{result['best_epoch']} ({result['epochs_run']} of {config['epochs']} epochs run, "
          f"{result['stopped'].replace('_', ' ')}, {in_words(seconds)})")
    print(f"Saved in {config['save_dir']}: {BEST_FILE}, {HISTORY_FILE}, {CURVES_FILE}")
    print(f"Training compute: {result['tflop']:.1f} TFLOP")
    print(f"Test accuracy: {result['test_acc']:.4f}")
    if result["views"] > 1:
        print(f"One view only: validation {result['best_val_acc_single']:.4f}, test "
              f"{result['test_acc_single']:.4f} (the accuracies above average "
              f"{result['views']} views)")
    if result["signal"]:
        again = " ".join(shlex.quote(a) for a in ["python", "train.py", *argv] if a != "--resume")
        sys.stderr.write(f"stopped after epoch {result['epochs_run']} of {config['epochs']}; "
                         f"continue with: {again} --resume\n")
        return 128 + result["signal"]
    return 0


if __name__ == "__main__":
    cli.run(main)
