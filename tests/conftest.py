"""Shared fixtures: tiny synthetic CIFAR-10 folders and archives in the official layout.

Other test modules may `from conftest import make_cifar_dir, make_archive`.
"""
import importlib.util
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# A test suite started in the background (`pytest &` in a script, nohup) inherits an ignored
# SIGINT, which its child processes would keep, as they should, so the tests that Ctrl-C a
# child would wait forever. A handler here becomes the default again in each child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def load_script(name):
    """Import a top-level script by path: `import test` would find Python's own test package."""
    spec = importlib.util.spec_from_file_location(f"{name}_script", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_child(code, *args, timeout=60, **kwargs):
    """Run Python `code` in a child process at the project root: the CompletedProcess."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout, **kwargs)


# A child that calls one loader and prints {"error": message or null, "maxrss_mb": peak}.
MEASURED = """
import json, sys
sys.path.insert(0, "tests")
import checkpoint, cifar10, cli, data_loader, model
from conftest import load_script
call = {call}
try:
    call(*sys.argv[1:])
    error = None
except cli.Error as exc:
    error = str(exc)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent through exec.
with open("/proc/self/status") as status:
    peak_kb = int(next(line for line in status if line.startswith("VmHWM:")).split()[1])
print(json.dumps({{"error": error, "maxrss_mb": peak_kb / 1024}}))
"""


def measured(call, *args, fsize=None):
    """Run `call` (source text of a callable) on `args` in a child; its report as a dict.

    With `fsize`, no file the child writes may exceed that many bytes (SIGXFSZ kills it)."""
    def limit():
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    result = run_child(MEASURED.format(call=call), *args, preexec_fn=limit if fsize else None)
    assert result.returncode == 0, (result.returncode, result.stderr)
    return json.loads(result.stdout.strip().splitlines()[-1])


FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]


def batch_bytes(data, labels, keys="bytes", legacy=True, protocol=3, numpy_labels=False,
                label="batch"):
    """One batch pickled as the official files are: a dict of 'batch_label', 'labels' (a list
    of ints), 'data' (a uint8 array) and 'filenames'.

    keys="bytes" writes the keys as bytes, as the official files' Python 2 str keys load with
    encoding='bytes'; "str" writes text keys. legacy=True names numpy.core.multiarray as the
    official files (written with NumPy 1) do, instead of NumPy 2's numpy._core. Protocol 3
    stores bytes natively, as the official files do; protocol 2 from Python 3 rebuilds them
    with _codecs.encode. numpy_labels=True stores the labels as NumPy ints, not Python ints.
    """
    def key(k):
        return k.encode() if keys == "bytes" else k

    batch = {key("batch_label"): key(label), key("labels"): [np.int64(y) if numpy_labels else int(y) for y in labels],
             key("data"): np.ascontiguousarray(data),
             key("filenames"): [key(f"image_{i}.png") for i in range(len(labels))]}
    raw = pickle.dumps(batch, protocol=protocol)
    if legacy:
        assert protocol <= 3, "the global's name is rewritten in the text form of protocols 0-3"
        raw = raw.replace(b"cnumpy._core.multiarray\n_reconstruct\n",
                          b"cnumpy.core.multiarray\n_reconstruct\n")
        assert b"numpy._core" not in raw
    return raw


def make_cifar_dir(root, n_per_batch=20, seed=0, **style):
    """Write root/cifar-10-batches-py with five training batches and a test batch of
    `n_per_batch` random images each, every class equally often (n_per_batch / 10 times).

    Returns the expected (train_images, train_labels, test_images, test_labels); `style`
    goes to `batch_bytes`.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, FOLDER)
    os.makedirs(folder, exist_ok=True)
    arrays = {}
    for name in TRAIN_FILES + ["test_batch"]:
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = rng.permutation(np.arange(n_per_batch) % 10)
        with open(os.path.join(folder, name), "wb") as f:
            f.write(batch_bytes(data, labels, label=name, **style))
        arrays[name] = data, labels
    meta = {b"label_names": [n.encode() for n in CLASS_NAMES],
            b"num_cases_per_batch": n_per_batch, b"num_vis": 3072}
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    train = [arrays[name] for name in TRAIN_FILES]
    return (np.concatenate([d for d, _ in train]), np.concatenate([y for _, y in train]),
            *arrays["test_batch"])


def make_archive(path, source_root, extra=()):
    """Write a tar.gz of source_root/cifar-10-batches-py, as the official archive holds it,
    plus `extra` members: (TarInfo, bytes or None) pairs, e.g. hostile ones."""
    with tarfile.open(path, "w:gz") as tar:
        tar.add(os.path.join(source_root, FOLDER), arcname=FOLDER)
        for info, content in extra:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


@pytest.fixture(params=["numpy", "numba"])
def implementation(request, monkeypatch):
    """Run the test with the NumPy references, then with the fused kernels (kernels.py)."""
    import kernels
    if request.param == "numba" and not kernels.AVAILABLE:
        pytest.skip("Numba is not installed")
    monkeypatch.setattr(kernels, "ENABLED", request.param == "numba")
    return request.param


@pytest.fixture
def cifar_dir(tmp_path):
    """A data folder (tmp_path/data) holding a tiny synthetic cifar-10-batches-py."""
    make_cifar_dir(tmp_path / "data")
    return tmp_path / "data"
