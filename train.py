"""Train ThreeLayerNN on CIFAR-10 with minibatch SGD, keeping the best weights on validation.

    python train.py                      # the default recipe (see config.py)
    python train.py --preset best        # the longer, more accurate recipe
    python train.py --lr 0.02 --hidden-size 512 256 --epochs 5
"""
import math
import os
import time

import numpy as np
from tqdm import tqdm

import cli
import config as cfg
import data_loader
import model


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


class SGD:
    """Minibatch SGD with L2 regularisation and optional (Nesterov) momentum, in place.

    The gradient of 0.5 * reg * |w|^2 is added here, and the update runs over cache-sized
    blocks, so that its few elementwise passes hit the CPU cache instead of memory.
    """

    BLOCK = 1 << 15  # float32 elements: 128 KB per array, three arrays fit in L2

    def __init__(self, params, momentum=0.0, nesterov=False, reg=0.0,
                 regularized=("w1", "w2", "w3")):
        self.momentum, self.nesterov = momentum, nesterov
        self.reg = {name: reg if name in regularized else 0.0 for name in params}
        self.velocity = {k: np.zeros_like(p) if momentum else None for k, p in params.items()}

    def step(self, params, grads, lr):
        for name, p in params.items():
            # Flat views (parameters, gradients and velocities are contiguous).
            p, g = p.reshape(-1), grads[name].reshape(-1)
            v = self.velocity[name]
            v = None if v is None else v.reshape(-1)
            for i in range(0, p.size, self.BLOCK):
                block = slice(i, i + self.BLOCK)
                self._update(p[block], g[block], None if v is None else v[block], lr,
                             self.reg[name])

    def _update(self, p, g, v, lr, reg):
        if reg:
            g += reg * p
        g *= lr  # the gradient arrays are fresh each step, so they may be overwritten
        if v is None:
            p -= g
            return
        v *= self.momentum
        v -= g
        if self.nesterov:  # look ahead: p += mu * v_new - lr * g
            p -= g
            p += self.momentum * v
        else:
            p += v


def evaluate(net, images, labels, mean, std, batch_size=2500):
    """Mean cross-entropy and accuracy on uint8 images, normalised batch by batch."""
    loss = correct = 0.0
    buffer = np.empty((min(batch_size, len(images)), images.shape[1]), net.dtype)
    for i in range(0, len(images), batch_size):
        chunk = slice(i, i + batch_size)
        y = labels[chunk]
        x = data_loader.normalize(images[chunk], mean, std, out=buffer[:len(y)])
        log_probs, _ = net.forward_pass(x)
        loss += -log_probs[np.arange(len(y)), y].sum()
        correct += (log_probs.argmax(axis=1) == y).sum()
    return float(loss) / len(labels), float(correct) / len(labels)


@np.errstate(over="ignore", invalid="ignore")  # divergence is detected and reported below
def train_epoch(net, optimizer, images, labels, mean, std, config, epoch, rng, progress):
    """One pass of minibatch SGD over shuffled, augmented images; returns loss, accuracy, lr."""
    batch_size = config["batch_size"]
    steps = len(images) // batch_size  # the last partial batch is dropped; reshuffling covers it
    order = rng.permutation(len(images))
    buffer = np.empty((batch_size, images.shape[1]), net.dtype)
    loss_sum = correct = 0.0
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{config['epochs']}", leave=False,
               disable=not progress, mininterval=0.5)
    for step in bar:
        idx = order[step * batch_size:(step + 1) * batch_size]
        xb, yb = images[idx], labels[idx]
        if config["flip"] or config["translate"]:
            xb = data_loader.augment(xb, rng, config["flip"], config["translate"])
        x = data_loader.normalize(xb, mean, std, out=buffer)
        lr = learning_rate(config, epoch - 1 + step / steps)
        log_probs, cache = net.forward_pass(x, rng if config["dropout"] else None)
        loss = -log_probs[np.arange(batch_size), yb].mean()
        if not np.isfinite(loss):
            raise Diverged(f"the loss became {loss} at epoch {epoch}, step {step + 1} "
                           f"(lr {lr:.3g}); try a smaller --lr")
        loss_sum += loss
        correct += (log_probs.argmax(axis=1) == yb).sum()
        grads = net.backward_pass(log_probs, yb, cache, 0.0, config["label_smoothing"])
        optimizer.step(net.params, grads, lr)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss_sum / (step + 1):.3f}",
                            acc=f"{correct / ((step + 1) * batch_size):.3f}")
    return float(loss_sum / steps), float(correct / (steps * batch_size)), lr


def check_fits(config, n_images):
    """Refuse a validation split or a batch that `n_images` training images cannot fill."""
    if not 0 < config["val_size"] < n_images:
        raise cli.Error(f"--val-size must be between 1 and {n_images - 1} (the number of "
                        f"training images minus one), got {config['val_size']}")
    if config["batch_size"] > n_images - config["val_size"]:
        raise cli.Error(f"--batch-size {config['batch_size']} is larger than the "
                        f"{n_images - config['val_size']} training images")


def train(config, data=None, on_epoch=None, progress=True, evaluate_test=False, verbose=None):
    """Train with `config`; write best.npy, history.json and curves.png to config['save_dir'].

    `progress` shows a progress bar, `verbose` (by default the same) a line per epoch.
    `on_epoch(record)` runs after each epoch; an exception from it stops training (the best
    checkpoint is already saved) and propagates. Ctrl-C stops cleanly and keeps the best.
    """
    cfg.check(config)
    model.get_activation(config["activation"])
    images, labels, test_images, test_labels = data or data_loader.load_data(config["data_dir"])
    check_fits(config, len(images))
    cli.writable_folder(config["save_dir"])  # an unwritable folder fails now, not after epoch 1
    x_train, y_train, x_val, y_val = data_loader.split_validation(
        images, labels, config["val_size"], config["seed"])
    mean, std = data_loader.compute_stats(x_train)

    dtype = np.dtype(config["dtype"])
    net = model.ThreeLayerNN(x_train.shape[1], config["hidden_size"], len(cfg.CLASS_NAMES),
                             config["activation"], config["seed"], dtype, config["dropout"])
    optimizer = SGD(net.params, config["momentum"], config["nesterov"], config["reg"])
    rng = np.random.default_rng(config["seed"])  # shuffling, augmentation and dropout

    save_dir = config["save_dir"]
    best_path = os.path.join(save_dir, "best.npy")
    history, best_acc, best_epoch, stopped = [], -1.0, 0, "completed"
    verbose = progress if verbose is None else verbose
    say = (tqdm.write if progress else print) if verbose else (lambda message: None)
    try:
        for epoch in range(1, config["epochs"] + 1):
            start = time.perf_counter()
            train_loss, train_acc, lr = train_epoch(net, optimizer, x_train, y_train, mean, std,
                                                    config, epoch, rng, progress)
            val_loss, val_acc = evaluate(net, x_val, y_val, mean, std)
            record = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                      "val_loss": val_loss, "val_acc": val_acc, "lr": lr,
                      "seconds": time.perf_counter() - start}
            history.append(record)
            if val_acc > best_acc:
                best_acc, best_epoch = val_acc, epoch
                model.save_checkpoint(best_path, net, mean, std, cfg.CLASS_NAMES, config,
                                      epoch=epoch, val_acc=val_acc)
            cli.write_json(os.path.join(save_dir, "history.json"),
                           {"config": config, "epochs": history})
            say(f"epoch {epoch:3d}  train loss {train_loss:.4f} acc {train_acc:.4f}  val loss "
                f"{val_loss:.4f} acc {val_acc:.4f}  lr {lr:.4g}  {record['seconds']:.1f}s"
                + ("  *best" if best_epoch == epoch else ""))
            if on_epoch:
                on_epoch(record)
            if config["patience"] and epoch - best_epoch >= config["patience"]:
                stopped = "early_stopping"
                say(f"no better validation accuracy for {config['patience']} epochs: stopping")
                break
    except KeyboardInterrupt:
        stopped = "interrupted"
        say(f"interrupted: the best checkpoint so far is kept in {best_path}")
    if history:
        import utils  # matplotlib is loaded only when there is something to draw
        utils.plot_history(history, os.path.join(save_dir, "curves.png"))

    test_acc = None
    if evaluate_test and best_epoch:
        best, meta = model.load_checkpoint(best_path)
        test_acc = evaluate(best, test_images, test_labels, meta["mean"], meta["std"])[1]
    return {"history": history, "best_val_acc": best_acc, "best_epoch": best_epoch,
            "epochs_run": len(history), "stopped": stopped, "checkpoint": best_path,
            "test_acc": test_acc}


def main(argv):
    parser = cli.Parser(description="Train the three-layer network on CIFAR-10. Every "
                        "configuration key is an option; the defaults are config.py's.")
    parser.add_argument("--preset", default="default", choices=sorted(cfg.PRESETS),
                        help="a named recipe from config.py, applied before the other options")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar (epoch lines are still printed)")
    cli.add_config_options(parser, cfg.DEFAULT_CONFIG, cfg.HELP,
                           {**cfg.CHOICES, "activation": sorted(model.ACTIVATIONS)})
    args = parser.parse_args(argv)
    try:
        config = cfg.make_config(args.preset, **cli.overrides(args, cfg.DEFAULT_CONFIG))
    except cli.Error as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    result = train(config, progress=not args.no_progress, evaluate_test=True, verbose=True)
    minutes = (time.perf_counter() - start) / 60
    if not result["best_epoch"]:
        raise cli.Error("interrupted before the first epoch ended: nothing was saved")
    print(f"Best validation accuracy: {result['best_val_acc']:.4f} (epoch {result['best_epoch']} "
          f"of {result['epochs_run']}, {result['stopped']}, {minutes:.1f} min)")
    print(f"Saved: {result['checkpoint']}, history.json and curves.png in {config['save_dir']}")
    print(f"Test accuracy: {result['test_acc']:.4f}")
    return 130 if result["stopped"] == "interrupted" else 0


if __name__ == "__main__":
    cli.run(main)
