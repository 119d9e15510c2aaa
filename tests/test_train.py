"""train.py: schedules, the optimiser, and whole training runs on a small synthetic set."""
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import checkpoint
import cli
import config as cfg
import inference
import limits
import model
import train

ROOT = Path(__file__).resolve().parent.parent


def synthetic_data(n_train=600, n_test=200, seed=0):
    """CIFAR-shaped uint8 images whose class sets a colour pattern: learnable, tiny."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(40, 216, size=(10, 3072))

    def make(n):
        labels = np.arange(n) % 10
        noise = rng.integers(-40, 41, size=(n, 3072))
        return np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8), labels.astype(np.int64)

    return (*make(n_train), *make(n_test))


def small_config(tmp_path, **overrides):
    base = dict(hidden_size=[32, 16], epochs=4, batch_size=50, lr=0.02, warmup_epochs=0.5,
                val_size=100, save_dir=str(tmp_path), translate=1, whiten=0, flip_average=False,
                test_shift=0, mixup=0.0)
    return cfg.make_config(**{**base, **overrides})


def test_schedules():
    c = cfg.make_config(lr=1.0, epochs=10, warmup_epochs=2.0, lr_schedule="cosine")
    assert train.learning_rate(c, 0) == 0 and train.learning_rate(c, 1) == pytest.approx(0.5)
    assert train.learning_rate(c, 2) == pytest.approx(1.0)
    assert train.learning_rate(c, 6) == pytest.approx(0.5)
    assert train.learning_rate(c, 10) == pytest.approx(0.0)
    c.update(lr_schedule="onecycle")
    assert train.learning_rate(c, 6) == pytest.approx(0.5)
    assert train.learning_rate(c, 8) == pytest.approx(0.25)
    c.update(lr_schedule="step", lr_decay=0.5, lr_step=2, warmup_epochs=0.0)
    assert [train.learning_rate(c, t) for t in (0, 1.9, 2, 5)] == [1.0, 1.0, 0.5, 0.25]
    c.update(lr_schedule="constant")
    assert train.learning_rate(c, 9.5) == 1.0


def test_training_learns_and_writes_everything(tmp_path):
    result = train.train(small_config(tmp_path), synthetic_data(), progress=False,
                         evaluate_test=True)
    assert result["best_val_acc"] > 0.8 and result["test_acc"] > 0.8
    assert result["stopped"] == "completed" and result["epochs_run"] == 4
    history = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in history["epochs"]] == [1, 2, 3, 4]
    assert set(history["epochs"][0]) == {"epoch", "train_loss", "train_acc", "val_loss",
                                        "val_acc", "lr", "tflop", "seconds"}
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    net, meta = checkpoint.load_checkpoint(tmp_path / "best.npy")
    assert meta["config"]["hidden_size"] == [32, 16] and meta["epoch"] == result["best_epoch"]


def test_checkpoint_holds_the_best_epoch_not_the_last(tmp_path, monkeypatch):
    # Two epochs of descent, then gradient ascent: the last epochs are the worst.
    monkeypatch.setattr(train, "learning_rate", lambda config, t: 0.02 if t < 2 else -0.002)
    data = synthetic_data()
    result = train.train(small_config(tmp_path, epochs=4, flip=False, translate=0), data,
                         progress=False)
    accs = [r["val_acc"] for r in result["history"]]
    assert result["best_epoch"] == 1 + int(np.argmax(accs)) <= 2 and accs[-1] < max(accs)
    net, meta = checkpoint.load_checkpoint(tmp_path / "best.npy")
    _, _, x_val, y_val = train.data_loader.split_validation(data[0], data[1], 100, 0)
    loss, acc = inference.evaluate(net, x_val, y_val, meta["prep"])
    assert acc == max(accs) and meta["epoch"] == result["best_epoch"]


def test_same_seed_same_history(tmp_path):
    def run(seed, folder):
        config = small_config(tmp_path / folder, seed=seed, dropout=0.2, epochs=2)
        history = train.train(config, synthetic_data(), progress=False)["history"]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in history]

    assert run(1, "a") == run(1, "b")
    assert run(1, "a") != run(2, "c")


def test_divergence_stops_with_advice(tmp_path):
    with pytest.raises(train.Diverged, match="smaller --lr"):
        train.train(small_config(tmp_path, lr=1e6, reg=0.0, warmup_epochs=0.0), synthetic_data(),
                    progress=False)


def test_early_stopping_and_interruption_keep_the_best(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "learning_rate", lambda config, t: 0.02 if t < 1 else -0.002)
    result = train.train(small_config(tmp_path / "a", epochs=6, patience=2), synthetic_data(),
                         progress=False)
    assert result["stopped"] == "early_stopping" and result["epochs_run"] < 6

    def interrupt(record):
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    result = train.train(small_config(tmp_path / "b"), synthetic_data(), on_epoch=interrupt,
                         progress=False)
    assert result["stopped"] == "interrupted" and result["epochs_run"] == 2
    checkpoint.load_checkpoint(tmp_path / "b" / "best.npy")


def test_batch_larger_than_the_data_is_refused(tmp_path):
    with pytest.raises(train.cli.Error, match="batch-size"):
        train.train(small_config(tmp_path, batch_size=10_000), synthetic_data(), progress=False)
    assert not (tmp_path / "best.npy").exists()


def test_same_numbers_as_the_stored_short_run(tmp_path):
    """Behaviour is unchanged by refactors and speed work: a short float64 run (dropout,
    smoothing, flips, shifts, Nesterov, L2) matches the history stored in tests/golden_run.json."""
    golden = json.loads((Path(__file__).parent / "golden_run.json").read_text())
    config = cfg.make_config(**golden["config"], save_dir=str(tmp_path))
    result = train.train(config, synthetic_data(), progress=False, evaluate_test=True)
    for got, want in zip(result["history"], golden["epochs"], strict=True):
        assert {k: got[k] for k in want} == pytest.approx(want, rel=1e-9)
    assert (result["test_acc"], result["best_epoch"]) == (golden["test_acc"], golden["best_epoch"])
    net, _ = checkpoint.load_checkpoint(tmp_path / "best.npy")
    sums = {k: float(np.abs(v).sum()) for k, v in net.params.items()}
    assert sums == pytest.approx(golden["weight_sums"], rel=1e-9)


def test_every_option_is_declared_once_and_reaches_the_command_line(capsys):
    assert set(cfg.DEFAULT_CONFIG) == set(cfg.HELP) == set(cfg.OPTIONS)
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for key, option in cfg.OPTIONS.items():
        assert f"--{key.replace('_', '-')}" in text and " ".join(option.help.split()) in text
    for alias in cfg.ALIASES:  # the report's names stay accepted at the edge
        assert f"--{alias.replace('_', '-')}" in text
    for name in cfg.PRESETS:  # how long each recipe takes
        assert f"{name} ({train.preset_time(name)})" in text
    assert f"default ({cfg.DEFAULT_CONFIG['epochs']} epochs, up to 65 min on 2 cores)" in text
    assert cfg.make_config(learning_rate=0.3, reg_lambda=0.2)["lr"] == 0.3
    for key, option in cfg.OPTIONS.items():
        if option.range:
            low = float(option.range[1:].split(",")[0])
            with pytest.raises(train.cli.Error, match=f"--{key.replace('_', '-')}"):
                cfg.make_config(**{key: type(option.default)(low - 1)})


@pytest.mark.parametrize("seconds,words", [(5, "5 s"), (89, "89 s"), (90, "2 min"),
                                           (2400, "40 min"), (5400, "1.5 h"), (7200, "2 h")])
def test_durations_are_said_in_units_people_use(seconds, words):
    assert train.in_words(seconds) == words


@pytest.mark.parametrize("given,shown", [(0, "0"), ([0], "0"), ([512, 0], "512 0"),
                                         ([-4], "-4"), ([1, 2, 3], "1 2 3")])
def test_a_bad_hidden_size_is_named_as_it_was_given(given, shown):
    with pytest.raises(cli.Error, match=f"--hidden-size takes one or two positive ints, got "
                       f"{shown}$"):
        cfg.make_config(hidden_size=given)


def test_training_compute_is_counted_in_closed_form(tmp_path):
    """2 x the multiply-adds of every matrix product: forward and backward of each step (no
    input gradient at the first layer) and the forward pass of each validation image."""
    config = small_config(tmp_path, epochs=3)  # 500 training images, batches of 50, 100 held out
    result = train.train(config, synthetic_data(), progress=False)
    d, (h1, h2), c = 3072, config["hidden_size"], 10
    macs = d * h1 + h1 * h2 + h2 * c
    per_epoch = 500 * (6 * macs - 2 * d * h1) + 100 * 2 * macs
    assert result["tflop"] * 1e12 == pytest.approx(3 * per_epoch, rel=1e-12)
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["training_tflop"] == result["tflop"]
    # Whitening adds its covariance product and one projection per image seen; each epoch
    # validates one view, and the chosen network is scored once on all its views (here the
    # image and its mirror, each shifted 1 pixel four ways: 10).
    config = small_config(tmp_path / "w", epochs=2, whiten=40, flip_average=True, test_shift=1)
    result = train.train(config, synthetic_data(), progress=False)
    k = 40
    macs = k * h1 + h1 * h2 + h2 * c
    m = k + 64  # leading_eigenvectors' block: 4 iterations, then the small problem
    fit = 2 * 500 * d * d + 2 * d * d * m * 6 + 2 * d * m * (m + k)
    expected = (fit + 2 * 500 * (6 * macs - 2 * k * h1 + 2 * d * k)
                + (2 + 10) * 100 * (2 * macs + 2 * d * k))
    assert result["tflop"] * 1e12 == pytest.approx(expected, rel=1e-12)
    history = json.loads((tmp_path / "w" / "history.json").read_text())
    assert history["training_tflop"] == result["tflop"] and result["views"] == 10
    assert history["chosen"]["val_acc"] == result["best_val_acc"]


def test_benchmark_prints_both_configurations_and_where_the_time_goes(capsys):
    import benchmark

    assert benchmark.main(["--hidden-size", "8", "--batch-size", "16", "--n-images", "64",
                           "--epochs", "1", "--no-torch", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "matmul peak:" in out and "of peak" in out and "matmuls of peak" in out
    header = next(line for line in out.splitlines() if "report" in line and "default" in line)
    assert header.split() == ["report", "default"]
    for name in ("affine_forward", "affine_backward", "step", "make_batch"):
        assert name in out


@pytest.mark.parametrize("args,why", [
    ([], "PyTorch is not installed (it is optional: pip install torch)"),
    (["--activation", "tanh"], "its twin is the plain ReLU network without dropout, which "
                               "these options change")])
def test_benchmark_says_why_there_is_no_pytorch_comparison(capsys, monkeypatch, args, why):
    import benchmark

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` fails as if not installed
    monkeypatch.setattr(benchmark, "matmul_peak", lambda: 100.0)
    assert benchmark.main(["--hidden-size", "8", "--batch-size", "16", "--n-images", "64",
                           "--epochs", "1", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if "PyTorch" in line] == [f"no PyTorch comparison: {why}"]


def test_a_network_too_big_for_the_machine_is_refused_before_the_data_is_read(tmp_path):
    config = small_config(tmp_path, hidden_size=[10**12, 1], data_dir=str(tmp_path / "none"))
    with pytest.raises(cli.UsageError, match=r"--hidden-size 1000000000000 1 needs [\d,]+ GiB"):
        train.train(config)
    assert not any(tmp_path.iterdir())  # nothing read, nothing written




# --- what train.py says ---------------------------------------------------------------------

TINY_RUN = ["--epochs", "3", "--hidden-size", "8", "--val-size", "20", "--batch-size", "10",
            "--warmup-epochs", "0", "--translate", "0", "--whiten", "16", "--no-progress"]


def train_main(argv, capsys):
    """train.py's command line in this process: (status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(train.main, [str(a) for a in argv])
    return (exit_info.value.code, *capsys.readouterr())


def test_train_says_what_it_does_while_starting_and_how_long_the_rest_takes(cifar_dir,
                                                                             tmp_path, capsys):
    code, out, err = train_main([*TINY_RUN, "--data-dir", cifar_dir, "--save-dir", tmp_path],
                                capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"read CIFAR-10 from {cifar_dir}: 100 training and 20 test images"
    assert lines[1] == "whitening: 16 principal components from 80 training images..."
    assert lines[2].startswith("epoch   1")
    assert lines[3].startswith("at this pace the other 2 epochs take about ")
    assert sum(line.startswith("at this pace") for line in lines) == 1


def test_a_stop_after_the_first_epoch_counts_the_epochs_planned(cifar_dir, tmp_path, capsys,
                                                                monkeypatch):
    real = train.train_epoch

    def stopped_in_epoch_2(*args):
        if args[6] == 2:
            raise cli.Stopped(signal.SIGTERM)
        return real(*args)

    monkeypatch.setattr(train, "train_epoch", stopped_in_epoch_2)
    code, out, err = train_main([*TINY_RUN, "--data-dir", cifar_dir, "--save-dir", tmp_path],
                                capsys)
    assert code == 143, err
    assert re.search(r"^Best validation accuracy: 0\.\d{4} at epoch 1 \(1 of 3 epochs run, "
                     r"interrupted, \d+ s\)$", out, re.M), out
    assert f"Saved in {tmp_path}: best.npy, history.json, curves.png\n" in out


def test_a_stop_while_starting_up_says_that_nothing_was_written(cifar_dir, tmp_path, capsys,
                                                                monkeypatch):
    def stopped(*args):
        raise cli.Stopped(signal.SIGTERM)

    monkeypatch.setattr(train.data_loader, "fit_preprocessing", stopped)
    save_dir = tmp_path / "results"
    code, out, err = train_main([*TINY_RUN, "--data-dir", cifar_dir, "--save-dir", save_dir],
                                capsys)
    assert code == 143
    assert err == ("error: stopped by SIGTERM while starting up, before the first epoch: "
                   "nothing was written; run the same command again\n")
    assert not save_dir.exists() or not any(p.name[0] != "." for p in save_dir.iterdir())


@pytest.mark.parametrize("options", [
    dict(hidden_size=[4100, 4100], dtype="float64"),  # w2 over 128 MiB
    dict(hidden_size=[5793, 5793]),  # the same in float32
    dict(hidden_size=[131_073, 1], whiten=1, dtype="float64"),  # b1 over 1 MiB
], ids=["float64 4100", "float32 5793", "first-layer bias"])
def test_a_network_its_own_loader_would_refuse_is_refused_before_the_data_is_read(
        tmp_path, options, monkeypatch):
    """Issue 24, item 3: these trained to the end, then their best.npy could not be loaded."""
    monkeypatch.setenv("CIFAR10_URL", "http://127.0.0.1:9/none")  # never a download
    config = small_config(tmp_path, **options, data_dir=str(tmp_path / "none"))
    with pytest.raises(cli.UsageError, match="its checkpoint would not load .* more than the"):
        train.train(config)
    assert not any(tmp_path.iterdir())


def test_the_largest_network_training_allows_loads(tmp_path):
    """One table: at the bound, what training accepts its loader reads, and one more is
    refused by both."""
    config = small_config(tmp_path, hidden_size=[1, 131_072], whiten=1, dtype="float64")
    train.check_network(config)
    net = model.ThreeLayerNN(1, (1, 131_072), 10, dtype=np.float64)
    checkpoint.save_checkpoint(tmp_path / "best.npy", net, np.zeros(1), np.ones(1),
                               [str(k) for k in range(10)], config)
    checkpoint.load_checkpoint(tmp_path / "best.npy")
    with pytest.raises(cli.UsageError, match="b2 of shape"):
        train.check_network({**config, "hidden_size": [1, 131_073]})
    net = model.ThreeLayerNN(1, (1, 131_073), 10, dtype=np.float64)
    with pytest.raises(checkpoint.CheckpointError, match="cannot save .*b2 of shape"):
        checkpoint.save_checkpoint(tmp_path / "best.npy", net, np.zeros(1), np.ones(1),
                                   [str(k) for k in range(10)], config)


def test_10000_epochs_fit_the_state_and_the_history_json():
    """config.py allows 10,000 epochs: a state's history of that many fits `meta`, and the
    history.json train.py writes fits what utils.py reads, with the longest floats."""
    record = {key: -1.2345678901234567e-100 for key in checkpoint.RECORD_KEYS}
    history = [{**record, "epoch": limits.EPOCHS}] * limits.EPOCHS
    config = cfg.make_config(save_dir="x" * 4096, data_dir="y" * 4096)
    meta = {"config": config, "run": {**checkpoint.new_run(), "history": history},
            "class_names": ["x" * limits.CLASS_NAME_CHARS] * 10}
    assert len(json.dumps(meta)) <= limits.META_CHARS
    written = json.dumps({"config": config, "training_tflop": 1 / 3, "epochs": history},
                         indent=2) + "\n"  # as files.write_json writes it
    assert len(written) <= limits.HISTORY_BYTES


def test_the_memory_check_honours_an_address_space_limit(tmp_path):
    """Issue 24, item 11: under `ulimit -v 2.5G`, --hidden-size 16000 passed the check (it
    compared with the machine's memory) and died after loading the data."""
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (5 << 29, 5 << 29))

    result = subprocess.run([sys.executable, "train.py", "--hidden-size", "16000", "--data-dir",
                             tmp_path / "none", "--save-dir", tmp_path / "run"], cwd=ROOT,
                            text=True, capture_output=True, timeout=60, preexec_fn=limit,
                            env={**os.environ, "CIFAR10_URL": "http://127.0.0.1:9/none"})
    assert result.returncode == 2, result.stderr
    assert re.fullmatch(r"error: --hidden-size 16000 16000 needs 3 GiB .*; this process may "
                        r"take [\d.]+ GiB\n", result.stderr), result.stderr


@pytest.mark.parametrize("version", [1, 2])
def test_the_memory_check_honours_the_cgroup_limit(tmp_path, monkeypatch, version):
    """A container's limit (cgroup v2 memory.max, or v1 memory.limit_in_bytes) of this
    process's cgroup or a parent of it."""
    root = tmp_path / "cgroup"
    if version == 2:
        line, folder, name = "0::/outer/inner", root, "memory.max"
    else:
        line, folder, name = "4:memory:/outer/inner", root / "memory", "memory.limit_in_bytes"
    (folder / "outer" / "inner").mkdir(parents=True)
    (folder / "outer" / name).write_text(f"{1 << 30}\n")
    (folder / "outer" / "inner" / name).write_text("max\n" if version == 2 else f"{1 << 62}\n")
    (tmp_path / "cgroup_of_self").write_text(f"1:cpu:/\n{line}\n")
    monkeypatch.setattr(train, "CGROUP_ROOT", str(root))
    monkeypatch.setattr(train, "PROC_CGROUP", str(tmp_path / "cgroup_of_self"))
    assert train.memory_available() == 1 << 30
    with pytest.raises(cli.UsageError, match="needs 3 GiB .* may take 1.0 GiB"):
        train.check_network(small_config(tmp_path, hidden_size=[16000, 16000], whiten=384))


def test_help_says_each_epochs_validation_scores_one_view():
    assert "each epoch's validation scores one view" in cfg.HELP["flip_average"]
    assert "each validation" not in cfg.HELP["flip_average"] + cfg.HELP["test_shift"]


def test_a_best_npy_deleted_while_training_is_said_so(tmp_path):
    def delete(record):
        if record["epoch"] == 2:
            (tmp_path / "best.npy").unlink()

    with pytest.raises(cli.Error, match=r"best\.npy was deleted while this run trained"):
        train.train(small_config(tmp_path, epochs=2, test_shift=1), synthetic_data(),
                    on_epoch=delete, progress=False)
