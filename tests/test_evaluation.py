"""test.py and utils.py: metrics against an independent count, plots, --image, errors."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
import data_loader
import model
import utils
from checkpoint import save_checkpoint
from conftest import load_script, make_cifar_dir

ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


evaluate = load_script("test")


def run(main, argv, capsys):
    """Run a script's main as the command line would: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.run(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def assert_one_error_line(err, *words):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert str(word) in lines[0], err


def assert_png(path):
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000, path


def save_tiny_model(path, input_size=3072, seed=0):
    """A small random network with plausible normalisation, saved as a checkpoint."""
    rng = np.random.default_rng(seed)
    net = model.ThreeLayerNN(input_size, 8, 10, "tanh", seed=seed)
    mean = rng.uniform(100, 150, input_size).astype(np.float32)
    std = rng.uniform(50, 70, input_size).astype(np.float32)
    save_checkpoint(path, net, mean, std, data_loader.CLASS_NAMES, {"hidden_size": [8, 8]})
    return net, mean, std


@pytest.fixture
def cifar(tmp_path):
    """A synthetic CIFAR-10 folder of 60 test images: (data_dir, test_images, test_labels)."""
    _, _, images, labels = make_cifar_dir(tmp_path / "data", n_per_batch=60)
    return tmp_path / "data", images, labels


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "run" / "best.npy"
    save_tiny_model(path)
    return path


def loop_metrics(labels, predictions, n_classes):
    """Confusion counts and per-class figures counted one image at a time."""
    counts = [[0] * n_classes for _ in range(n_classes)]
    for y, p in zip(labels, predictions):
        counts[y][p] += 1
    rows = []
    for k in range(n_classes):
        tp = fp = fn = 0
        for y, p in zip(labels, predictions):
            tp += y == k and p == k
            fp += y != k and p == k
            fn += y == k and p != k
        rows.append({"accuracy": tp / (tp + fn) if tp + fn else 0.0,  # per class: recall
                     "precision": tp / (tp + fp) if tp + fp else 0.0, "support": tp + fn})
    return counts, rows


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_match_an_independent_count():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 300)
    labels[labels == 3] = 2  # class 3 never occurs: recall 0/0
    predictions = np.where(rng.random(300) < 0.6, labels, rng.integers(0, 5, 300))
    predictions[predictions == 4] = 0  # class 4 is never predicted: precision 0/0
    names = ["a", "b", "c", "d", "e"]

    metrics = evaluate.evaluation_metrics(labels, predictions, names)
    counts, rows = loop_metrics(labels.tolist(), predictions.tolist(), 5)
    assert metrics["confusion"] == counts
    assert metrics["n"] == 300 == sum(map(sum, counts))
    assert metrics["accuracy"] == pytest.approx(np.mean(labels == predictions))
    for name, row in zip(names, rows):
        assert metrics["per_class"][name] == pytest.approx(row)
    assert metrics["per_class"]["d"]["accuracy"] == 0 and metrics["per_class"]["e"]["precision"] == 0
    json.dumps(metrics, allow_nan=False)  # plain JSON types, no NaN


def test_confusion_matrix_refuses_labels_out_of_range():
    with pytest.raises(ValueError, match="labels"):
        utils.confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="predictions"):
        utils.confusion_matrix([0, 1], [0, -1], 3)


# --- plots ------------------------------------------------------------------------------------


def test_every_plot_writes_a_png(tmp_path):
    rng = np.random.default_rng(0)
    records = [{"epoch": e, "train_loss": 2 / e, "train_acc": 0.3 + e / 20, "val_loss": 2.1 / e,
                "val_acc": 0.3 + e / 25, "lr": 0.05 / e, "seconds": 1.0} for e in range(1, 6)]
    images = rng.integers(0, 256, (50, 3072), dtype=np.uint8)
    labels, predictions = rng.integers(0, 10, 50), rng.integers(0, 10, 50)
    utils.plot_history(records, tmp_path / "curves.png")
    prep = data_loader.Preprocessing(np.zeros(3072), np.ones(3072))
    utils.plot_weights(rng.normal(size=(3072, 12)), prep, tmp_path / "weights.png")
    utils.plot_confusion(utils.confusion_matrix(labels, predictions, 10), data_loader.CLASS_NAMES,
                         tmp_path / "confusion.png")
    utils.plot_misclassified(images, labels, predictions, data_loader.CLASS_NAMES,
                             tmp_path / "wrong.png", n=10)
    utils.plot_misclassified(images, labels, labels, data_loader.CLASS_NAMES, tmp_path / "none.png")
    utils.plot_history([], tmp_path / "empty.png")
    written = sorted(os.listdir(tmp_path))  # and no temporary files left behind
    assert written == sorted(["curves.png", "weights.png", "confusion.png", "wrong.png",
                              "none.png", "empty.png"])
    for name in written:
        assert_png(tmp_path / name)


@pytest.mark.parametrize("values,ticks", [([1], [1]), ([1, 2], [1, 2]), ([0, 1, 2], [0, 1, 2]),
                                          (range(1, 101), [0, 20, 40, 60, 80, 100])])
def test_epochs_and_trials_are_counted_in_whole_ticks(values, ticks):
    """A one-epoch history had ticks 0.945 ... 1.050."""
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    ax.plot(values, np.ones(len(values)))
    utils.count_axis(ax, values)
    low, high = ax.get_xlim()
    assert low < min(values) and max(values) < high
    assert [t for t in ax.get_xticks() if low <= t <= high] == ticks


def test_weights_that_are_not_images_are_refused(tmp_path):
    prep = data_loader.Preprocessing(np.zeros(100), np.ones(100))
    with pytest.raises(cli.Error, match="32x32"):
        utils.plot_weights(np.zeros((100, 8)), prep, tmp_path / "w.png")
    assert not (tmp_path / "w.png").exists()


def test_weights_are_drawn_as_the_images_that_become_them():
    """A whitened network's weights are drawn as the pixel images whose whitened form they are
    (their filter on pixels, whitening @ w1, is mostly the fine detail whitening amplifies);
    a plain one's as the pixel images whose normalised form they are."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 3072), dtype=np.uint8)
    whitened, _ = data_loader.fit_preprocessing(images, whiten=20)
    plain = data_loader.Preprocessing(whitened.mean, whitened.std)
    for prep, w1 in ((whitened, rng.normal(size=(20, 5))), (plain, rng.normal(size=(3072, 5)))):
        patterns = utils.input_patterns(w1, prep)
        assert patterns.shape == (3072, 5)
        network_input = data_loader.preprocess(patterns.T + prep.mean, prep, np.float64)
        assert np.allclose(network_input, w1.T, atol=1e-4 * abs(w1).max())


# --- test.py on a test set --------------------------------------------------------------------


def independent_predictions(net, mean, std, images):
    return np.argmax(net.forward((images.astype(np.float64) - mean) / std), axis=1)


def test_evaluation_prints_the_accuracy_of_its_confusion_matrix(cifar, tmp_path, capsys):
    cifar_dir, images, labels = cifar
    path = tmp_path / "best.npy"
    net, mean, std = save_tiny_model(path)
    out_dir = tmp_path / "out"
    code, out, err = run(evaluate.main, ["--model", path, "--data-dir", cifar_dir,
                                         "--out-dir", out_dir, "--batch-size", 7], capsys)
    assert code == 0, err
    printed = float(re.search(r"^Test accuracy: (0\.\d{4})$", out, re.M).group(1))
    metrics = json.loads((out_dir / "test_metrics.json").read_text())
    counts = np.array(metrics["confusion"])
    assert counts.sum() == metrics["n"] == len(labels)
    assert np.trace(counts) / len(labels) == pytest.approx(printed, abs=5e-5)
    # The same figures from predictions made here, without test.py's batching.
    predictions = independent_predictions(net, mean, std, images)
    expected_counts, rows = loop_metrics(labels.tolist(), predictions.tolist(), 10)
    assert metrics["confusion"] == expected_counts
    for name, row in zip(data_loader.CLASS_NAMES, rows):
        assert metrics["per_class"][name] == pytest.approx(row)
        assert re.search(rf"^{name}\s+{row['accuracy']:.4f}\s+{row['precision']:.4f}\s+"
                         rf"{row['support']}$", out, re.M), out
    assert metrics["model"] == str(path)
    assert_png(out_dir / "confusion_matrix.png")
    assert_png(out_dir / "misclassified.png")


def test_a_model_of_another_input_size_is_refused(cifar_dir, tmp_path, capsys):
    path = tmp_path / "small.npy"
    save_tiny_model(path, input_size=12)
    code, _, err = run(evaluate.main, ["--model", path, "--data-dir", cifar_dir,
                                       "--out-dir", tmp_path], capsys)
    assert code == 1
    assert_one_error_line(err, path, "12 inputs", "3072")
    image = tmp_path / "a.png"
    Image.new("RGB", (40, 40)).save(image)
    code, _, err = run(evaluate.main, ["--model", path, "--image", image], capsys)
    assert code == 1
    assert_one_error_line(err, "12 inputs", "3072")


@pytest.mark.parametrize("content", [None, b"not a model", b"PK\x03\x04 truncated zip"])
def test_missing_or_corrupt_model_is_one_clear_error(tmp_path, capsys, content):
    path = tmp_path / "best.npy"
    if content is not None:
        path.write_bytes(content)
    code, out, err = run(evaluate.main, ["--model", path, "--out-dir", tmp_path], capsys)
    assert code == 1 and out == ""
    assert_one_error_line(err, path, "no model at" if content is None else "checkpoint")


# --- --image ----------------------------------------------------------------------------------


def test_image_layout_is_cifar_planes(tmp_path):
    # Left half red, right half blue, 80x64: cropped to the centre 64x64, then halved.
    pixels = np.zeros((64, 80, 3), np.uint8)
    pixels[:, :40, 0] = 255
    pixels[:, 40:, 2] = 255
    Image.fromarray(pixels).save(tmp_path / "halves.png")
    red, green, blue = evaluate.load_image(tmp_path / "halves.png").reshape(3, 32, 32)
    left, right = np.s_[:, :14], np.s_[:, 18:]  # away from the resampled edge
    assert (red[left] > 245).all() and (red[right] < 10).all()
    assert (blue[left] < 10).all() and (blue[right] > 245).all()
    assert (green < 10).all()


def test_transparent_areas_become_white(tmp_path):
    Image.new("RGBA", (48, 40), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (evaluate.load_image(tmp_path / "clear.png") == 255).all()


def test_images_are_classified_with_top_three(checkpoint, tmp_path, capsys):
    rng = np.random.default_rng(0)
    png, jpg = tmp_path / "wide.png", tmp_path / "photo.jpg"
    Image.fromarray(rng.integers(0, 256, (40, 50, 4), dtype=np.uint8), "RGBA").save(png)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(jpg, quality=90)
    code, out, err = run(evaluate.main, ["--model", checkpoint, "--image", png, jpg], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(png), str(jpg)]
    for line in lines:
        guesses = re.findall(r"(\w+) (\d\.\d{3})", line.split(": ", 1)[1])
        assert len(guesses) == 3 and all(name in data_loader.CLASS_NAMES for name, _ in guesses)
        probs = [float(p) for _, p in guesses]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0005
    assert not (tmp_path / "test_metrics.json").exists()  # no test-set evaluation


@pytest.mark.parametrize("content", [None, b"this is not a picture", PNG_MAGIC + b"\0" * 20])
def test_an_unreadable_image_is_one_error_line_and_the_others_are_classified(
        checkpoint, tmp_path, capsys, content):
    good, bad, also_good = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "also.jpg"
    Image.new("RGB", (32, 32)).save(good)
    Image.new("RGB", (40, 30), "red").save(also_good)
    if content is not None:
        bad.write_bytes(content)
    code, out, err = run(evaluate.main, ["--model", checkpoint, "--image", good, bad, also_good],
                         capsys)
    assert code == 1
    assert [line.split(": ")[0] for line in out.splitlines()] == [str(good), str(also_good)]
    assert_one_error_line(err, "cannot read image", bad)


# --- utils.py on the command line -------------------------------------------------------------


def test_utils_redraws_every_picture_without_a_display(cifar_dir, checkpoint, tmp_path):
    history = {"config": {}, "epochs": [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.5,
                                        "val_loss": 1.1 / e, "val_acc": 0.4, "lr": 0.01,
                                        "seconds": 1.0} for e in (1, 2, 3)]}
    (checkpoint.parent / "history.json").write_text(json.dumps(history))
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "TkAgg"  # a user's interactive backend setting must not matter
    result = subprocess.run([sys.executable, "utils.py", "--model", str(checkpoint),
                             "--data-dir", str(cifar_dir)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in ("weights.png", "curves.png", "confusion_matrix.png", "misclassified.png"):
        assert_png(checkpoint.parent / name)
        assert name in result.stdout

