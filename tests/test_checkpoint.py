"""checkpoint.py: checkpoints and run states round-trip, and bad ones give clear errors."""
import numpy as np
import pytest

import checkpoint
import cli
import data_loader
import model
import optim
import train
from checkpoint import load_checkpoint, save_checkpoint
from model import ThreeLayerNN
from test_train import small_config


def save_tiny(path, net=None):
    net = net or ThreeLayerNN(12, (5, 4), 3, "tanh", seed=1)
    mean, std = np.arange(12, dtype=np.float32), np.ones(12, np.float32)
    save_checkpoint(path, net, mean, std, ["a", "b", "c"], {"lr": 0.1}, epoch=3, val_acc=0.5)
    return net


def test_checkpoint_round_trip(tmp_path):
    path = tmp_path / "best.npy"
    net = save_tiny(path)
    loaded, meta = load_checkpoint(path)
    x = np.random.default_rng(0).normal(size=(20, 12)).astype(np.float32)
    assert np.array_equal(loaded.predict(x), net.predict(x))
    assert np.array_equal(loaded.forward(x), net.forward(x))
    assert (loaded.activation, loaded.hidden_size) == ("tanh", (5, 4))
    assert meta["class_names"] == ["a", "b", "c"] and meta["config"] == {"lr": 0.1}
    assert meta["epoch"] == 3 and np.array_equal(meta["mean"], np.arange(12))
    assert [p.name for p in tmp_path.iterdir()] == ["best.npy"]  # no temporary left


def corrupt(path, **arrays):
    """Rewrite a saved checkpoint with some arrays replaced (None removes one)."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    data.update(arrays)
    with open(path, "wb") as f:
        np.savez(f, **{k: v for k, v in data.items() if v is not None})


@pytest.mark.parametrize("change,message", [
    (dict(w2=np.zeros((6, 4), np.float32)), "do not chain"),
    (dict(w1=np.zeros((12, 5), np.int64)), "dtype"),
    (dict(b3=None), "missing b3"),
    (dict(w3=np.full((4, 3), np.nan, np.float32)), "NaN"),
    (dict(std=np.zeros(12, np.float32)), "std"),
    (dict(meta=np.array("{not json")), "metadata"),
    (dict(meta=np.array('{"activation": "evil", "class_names": ["a", "b", "c"]}')), "activation"),
    (dict(w1=np.array([{"a": 1}], dtype=object)), "not a readable checkpoint"),
])
def test_bad_checkpoints_give_clear_errors(tmp_path, change, message):
    path = tmp_path / "best.npy"
    save_tiny(path)
    corrupt(path, **change)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        load_checkpoint(path)


def test_truncated_missing_and_foreign_files(tmp_path):
    path = tmp_path / "best.npy"
    save_tiny(path)
    data = path.read_bytes()
    for size in (0, 10, len(data) // 2, len(data) - 30):
        path.write_bytes(data[:size])
        with pytest.raises(checkpoint.CheckpointError):
            load_checkpoint(path)
    with pytest.raises(checkpoint.CheckpointError, match="no model"):
        load_checkpoint(tmp_path / "absent.npy")
    np.save(tmp_path / "plain.npy", np.zeros(3))
    with pytest.raises(checkpoint.CheckpointError, match="single array"):
        load_checkpoint(tmp_path / "plain.npy")


def test_a_state_from_another_version_names_the_options_that_differ(tmp_path):
    config = small_config(tmp_path)
    net = model.ThreeLayerNN(12, [4, 3], 10)
    optimizer = optim.SGD(net.params, 0.9)
    prep = data_loader.Preprocessing(np.zeros(12, np.float32), np.ones(12, np.float32), None)
    older = {k: v for k, v in config.items() if k != "whiten_eps"}
    older["lr_min\x1b[2J"] = 0.0  # an option this version lacks (its name escaped when shown)
    path = tmp_path / train.STATE_FILE
    checkpoint.save_state(path, net, optimizer, np.random.default_rng(0), prep, older,
                          checkpoint.new_run())
    with pytest.raises(cli.UsageError) as refused:
        checkpoint.load_state(path, config, net, optimizer, np.random.default_rng(0), prep)
    message = str(refused.value)
    assert "--lr-min\\x1b[2J 0.0 (no such option in this version)" in message, message
    assert "--whiten-eps (not in the state: saved by another version)" in message, message
    assert "\x1b" not in message and "--lr " not in message


@pytest.mark.parametrize("shift", [-1, 17, 10**4000, 1.5, 2.0, True, "2", None, [2]])
@pytest.mark.parametrize("script", ["test", "utils"])
def test_a_bad_test_shift_in_meta_is_one_error_line(tmp_path, capsys, script, shift):
    from conftest import load_script
    path = tmp_path / "best.npy"
    save_checkpoint(path, ThreeLayerNN(3072, 4, 10), np.zeros(3072, np.float32),
                    np.ones(3072, np.float32), data_loader.CLASS_NAMES, {}, test_shift=shift)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_script(script).main, ["--model", str(path), "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert err.endswith("test_shift is not a whole number of 0 to 16\n")
