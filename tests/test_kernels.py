"""kernels.py: each fused kernel gives its NumPy reference's result bit for bit."""
import os
import subprocess
import sys

import numpy as np
import pytest

import data_loader
import kernels
import optim
from conftest import ROOT, run_child

pytestmark = pytest.mark.skipif(not kernels.ENABLED, reason="Numba is not installed")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum,nesterov,reg", [(0.0, False, 0.0), (0.9, False, 1e-3),
                                                   (0.9, True, 5e-4)])
def test_sgd_update_is_the_reference_bit_for_bit(dtype, momentum, nesterov, reg):
    rng = np.random.default_rng(0)
    p, g, v = (rng.standard_normal(10_007).astype(dtype) for _ in range(3))
    v = v if momentum else v[:0]
    ours = [a.copy() for a in (p, g, v)]
    scalars = [dtype(x) for x in (0.05, momentum, reg)]
    optim.SGD.update(p, g, v, *scalars, nesterov)
    kernels.sgd_update(*ours, *scalars, nesterov)
    assert np.array_equal(ours[0], p) and np.array_equal(ours[2], v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("rotate", [0, 30])
def test_make_batch_is_gather_warp_and_normalize_bit_for_bit(dtype, rotate):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(50, 3072), dtype=np.uint8)
    mean, std = data_loader.compute_stats(images)
    idx = rng.permutation(50)[:17]
    flips, shifts, turns = data_loader.draw_augmentation(17, rng, True, 16, rotate)
    out = np.empty((17, 3072), dtype)  # shifts as far as --translate goes
    kernels.make_batch(images, idx, flips, shifts, turns, mean, std, out)
    reference = data_loader.normalize(data_loader.warp(images[idx], flips, shifts, turns),
                                      mean, std, np.empty((17, 3072), dtype))
    assert np.array_equal(out, reference)


def test_a_numba_that_does_not_load_leaves_the_references_and_one_warning(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    monkeypatch.setattr(kernels, "ENABLED", True)
    for kernel in (kernels.make_batch, kernels.sgd_update):
        monkeypatch.setattr(kernel, "compiled", None)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 3072), dtype=np.uint8)
    prep = data_loader.fit_preprocessing(images)[0]
    x = data_loader.preprocess(images, prep)
    p = {"w1": np.ones(4, np.float32)}
    optim.SGD(p, momentum=0.9).step(p, {"w1": np.ones(4, np.float32)}, 0.5)
    assert np.array_equal(x, data_loader.normalize(images, prep.mean, prep.std))
    assert np.array_equal(p["w1"], np.full(4, 0.5, np.float32)) and not kernels.ENABLED
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: Numba is installed but does not")


def test_kernels_with_no_folder_to_cache_in_are_compiled_without_a_cache(tmp_path):
    # A read-only install: no __pycache__ beside kernels.py, no writable NUMBA_CACHE_DIR.
    (tmp_path / "kernels.py").write_text((ROOT / "kernels.py").read_text())
    (tmp_path / "__pycache__").write_text("")
    blocked = tmp_path / "__pycache__" / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NUMBA_CACHE_DIR": str(blocked),
           "HOME": str(blocked), "XDG_CACHE_HOME": str(blocked)}
    code = ("import numpy as np, kernels; p = np.ones(3); "
            "kernels.sgd_update(p, p.copy(), p[:0], 0.5, 0.0, 0.0, False); print(p.sum())")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                            capture_output=True, timeout=300)
    assert (result.returncode, result.stdout) == (0, "1.5\n"), result.stderr
    assert result.stderr.startswith("warning: the kernel sgd_update is compiled again each run")


BAD_BATCHES = """
import numpy as np, data_loader, optim
images = np.zeros((5, 3072), np.uint8)
prep = data_loader.fit_preprocessing(images)[0]
batch, w = data_loader.make_batch, {"w": np.ones(9)}
for call in [lambda: batch(images, np.array([10**7]), prep),
             lambda: batch(images[:, :1000], np.arange(2), prep),
             lambda: batch(images, np.arange(2), prep._replace(mean=prep.mean[:9])),
             lambda: batch(images, np.arange(2), prep, out=np.empty((1, 3072))),
             lambda: optim.SGD(w, 0.9).step(w, {"w": np.ones(2)}, 1)]:
    try:
        call()
    except (ValueError, IndexError) as exc:
        print(type(exc).__name__)
"""


def test_the_kernels_refuse_what_they_would_read_or_write_out_of_bounds():
    # NumPy's references raise on each; unchecked, the kernels crashed or corrupted memory.
    result = subprocess.run([sys.executable, "-c", BAD_BATCHES], cwd=ROOT, text=True,
                            capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["IndexError", *["ValueError"] * 4]


WARM_UP = """
import sys, tempfile
sys.path.insert(0, "tests")
import config as cfg, kernels, train
from test_train import synthetic_data
data = synthetic_data()
config = cfg.make_config(hidden_size=[16, 8], epochs=1, batch_size=50, val_size=100, whiten=0,
                         mixup=0.2, test_shift=1, save_dir=tempfile.mkdtemp())
train.warm_up_kernels(data[0], data[1], config).join()
def compiled():
    return {k.__name__: list(k.compiled.signatures) for k in (kernels.make_batch, kernels.sgd_update)}
ready = compiled()
train.train(config, data, progress=False, evaluate_test=True)
print(ready == compiled() and all(ready.values()), ready, compiled())
"""


def test_the_warm_up_readies_every_kernel_a_run_calls():
    # Loading a kernel takes about a second at its first call; the warm-up takes it off the
    # run's path only if it readies the very signatures (dtypes, layouts) the run calls.
    result = run_child(WARM_UP, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("True"), result.stdout + result.stderr
