"""Hostile and broken inputs (issue 12): crafted pickles, bombs, odd files, images and values.

Each test builds its attack synthetically. Bombs run in a child process that reports its own
peak memory (ru_maxrss) and, for disk, runs under RLIMIT_FSIZE, so a regression shows as a
number over its bound or a child killed by SIGXFSZ, never as a full machine.
"""
import codecs
import hashlib
import http.server
import io
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import checkpoint
import cifar10
import cli
import conftest
import data_loader
import limits
import model
import utils
from conftest import load_script, make_cifar_dir, measured, run_child

try:
    from numpy._core.multiarray import _reconstruct
except ImportError:  # NumPy 1
    from numpy.core.multiarray import _reconstruct

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
evaluate = load_script("test")


# --- helpers ----------------------------------------------------------------------------------


def run_script(script, *args, timeout=60):
    return subprocess.run([sys.executable, script, *map(str, args)], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


def assert_one_error_line(result, *words):
    """Exit status 1 and exactly one line on stderr, an `error:` line holding `words`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, (result.returncode, result.stderr)
    assert lines[0].startswith("error: "), result.stderr
    for word in words:
        assert str(word) in lines[0], result.stderr


def save_model(path, std=None, scale=1.0, class_names=data_loader.CLASS_NAMES):
    """A small CIFAR-sized checkpoint; `std` and `scale` make its arithmetic extreme."""
    net = model.ThreeLayerNN(3072, (8, 8), 10, "relu", seed=0)
    for k in ("w1", "w2", "w3"):
        setattr(net, k, getattr(net, k) * np.float32(scale))
    mean = np.full(3072, 120, np.float32)
    std = np.full(3072, 60 if std is None else std, np.float32)
    checkpoint.save_checkpoint(path, net, mean, std, class_names, {})
    return path


def write_zip(path, members, level=1):
    """A zip archive of `members`: name -> bytes, or an int n for n zero bytes (a bomb)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=level) as zf:
        for name, content in members.items():
            with zf.open(name, "w", force_zip64=True) as out:
                if isinstance(content, int):
                    zeros = bytes(16 * MB)
                    for start in range(0, content, len(zeros)):
                        out.write(zeros[:content - start])
                else:
                    out.write(content)
    return path


def checkpoint_members(path):
    with zipfile.ZipFile(path) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


@pytest.fixture
def ckpt(tmp_path):
    return save_model(tmp_path / "best.npy")


# --- 1, 2: crafted batch pickles --------------------------------------------------------------


class Reduced:
    """Pickles as whatever `reduce` says: a way to write a crafted pickle by hand."""

    def __init__(self, *reduce):
        self.reduce = reduce

    def __reduce__(self):
        return self.reduce


def crafted_array(dtype_args, dtype_state, shape, data, fortran=False):
    """An ndarray pickle as NumPy writes one, with the dtype's arguments and state chosen."""
    dtype = Reduced(np.dtype, dtype_args, dtype_state)
    return Reduced(_reconstruct, (np.ndarray, (0,), b"b"), (1, shape, dtype, fortran, data))


# A void dtype with an object field, flagged "holds references" but not "pickled as a list":
# NumPy then takes 8 raw bytes for a pointer, and freeing the array crashes (SIGSEGV).
OBJECT_FIELD = ((3, "|", None, ("f0",), {"f0": (np.dtype("O"), 0)}, 8, 1, 1))
CRAFTED = {
    "void with an object field": crafted_array(("V8", False, True), OBJECT_FIELD, (1,), b"A" * 8),
    "uint8 with flags": crafted_array(("u1", False, True), (3, "|", None, None, None, -1, -1, 1),
                                      (1, 3072), bytes(3072)),
    "uint8 with fields": crafted_array(("u1", False, True), (3, "|", None, ("f0",),
                                       {"f0": (np.dtype("u1"), 0)}, 1, 1, 0), (1, 3072),
                                       bytes(3072)),
    "object": crafted_array(("O8", False, True), (3, "|", None, None, None, -1, -1, 63),
                            (1,), [None]),
    "float": crafted_array(("f8", False, True), (3, "<", None, None, None, -1, -1, 0),
                           (1, 3072), bytes(8 * 3072)),
    "zero strides": Reduced(np.ndarray, ((200_000, 3072), np.dtype("u1"), bytes(3072), 0, (0, 1))),
    "Fortran order": crafted_array(("u1", False, True), (3, "|", None, None, None, -1, -1, 0),
                                   (2, 3072), bytes(2 * 3072), fortran=True),
    "short buffer": crafted_array(("u1", False, True), (3, "|", None, None, None, -1, -1, 0),
                                  (10_000, 3072), bytes(3072)),
    "more images than CIFAR's": crafted_array(("u1", False, True),
                                              (3, "|", None, None, None, -1, -1, 0),
                                              (10_001, 3072), bytes(10_001 * 3072)),
}


def write_batch(data_dir, data, labels=(0,), name="data_batch_1"):
    path = Path(data_dir) / "cifar-10-batches-py" / name
    labels = list(labels) if isinstance(labels, tuple) else labels
    path.write_bytes(pickle.dumps({b"data": data, b"labels": labels}, protocol=2))
    return path


def test_a_crafted_dtype_gives_an_error_line_not_a_crash(tmp_path, ckpt):
    """Item 1: the pickle that made test.py die with SIGSEGV (exit 139) before the fix."""
    make_cifar_dir(tmp_path / "data")
    write_batch(tmp_path / "data", CRAFTED["void with an object field"], name="test_batch")
    result = run_script("test.py", "--model", ckpt, "--data-dir", tmp_path / "data",
                        "--out-dir", tmp_path / "out")
    assert result.returncode != -signal.SIGSEGV
    assert_one_error_line(result, "test_batch", "refused")


@pytest.mark.parametrize("attack", CRAFTED)
def test_crafted_arrays_are_refused(tmp_path, attack):
    """Items 1 and 2: only plain C-ordered integer arrays of CIFAR's size are built."""
    make_cifar_dir(tmp_path)
    write_batch(tmp_path, CRAFTED[attack])
    with pytest.raises(data_loader.DataError, match="data_batch_1"):
        data_loader.load_data(tmp_path, url="http://127.0.0.1:9/none")


def test_zero_strides_take_no_memory(tmp_path):
    """Item 2: 200,000 images over a 3 KB buffer used 3.6 GB before the fix."""
    make_cifar_dir(tmp_path)
    labels = Reduced(np.ndarray, ((200_000,), np.dtype("i8"), bytes(8), 0, (0,)))
    write_batch(tmp_path, CRAFTED["zero strides"], labels)
    report = measured("cifar10.read_folder", tmp_path / "cifar-10-batches-py")
    assert "data_batch_1" in report["error"] and report["maxrss_mb"] < 150, report


def test_numpy_int_labels_and_big_endian_arrays_still_load(tmp_path):
    """What the stand-ins must keep accepting: NumPy int labels, arrays of any byte order."""
    make_cifar_dir(tmp_path)
    data = np.arange(20 * 3072).astype(np.uint8).reshape(20, 3072)
    labels = np.arange(20, dtype=">i4") % 10
    path = Path(tmp_path) / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": data, "labels": labels}, protocol=4))
    got, y = cifar10.read_batch(path)
    assert np.array_equal(got, data) and y.tolist() == (np.arange(20) % 10).tolist()
    path.write_bytes(pickle.dumps({"data": data, "labels": [np.int64(k) for k in labels]}))
    assert cifar10.read_batch(path)[1].tolist() == labels.tolist()


def test_a_huge_sparse_batch_file_is_refused_by_its_size(tmp_path):
    """Past the list: a 10 GB sparse file is refused before a byte is read."""
    make_cifar_dir(tmp_path)
    path = Path(tmp_path) / "cifar-10-batches-py" / "data_batch_1"
    os.truncate(path, 10 << 30)
    report = measured("cifar10.read_batch", path)
    assert "more than" in report["error"] and report["maxrss_mb"] < 150, report


# --- 3: checkpoint zip bombs ------------------------------------------------------------------


@pytest.mark.parametrize("bomb, message", [
    ({"extra.npy": 512 * MB}, "unknown members extra"),  # was read: 4.2 GB for a 2 GiB one
    ({"w1.npy": 512 * MB}, "declares"),  # a known member larger than its bound
])
def test_checkpoint_bombs_are_refused_before_decompression(tmp_path, ckpt, bomb, message):
    members = {**checkpoint_members(ckpt), **bomb}
    write_zip(ckpt, members)
    assert ckpt.stat().st_size < 4 * MB
    report = measured("checkpoint.load_checkpoint", ckpt)
    assert message in report["error"] and report["maxrss_mb"] < 150, report


@pytest.mark.parametrize("member, message", [
    (lambda: npy_bytes(np.zeros((4096, 4097), np.float64)), "more than"),  # > MAX_WEIGHT_BYTES
    (lambda: npy_bytes(np.zeros((3072, 8), np.float32)) + b"trailing", "more data"),
    (lambda: npy_bytes(np.zeros((3072, 8), np.float32))[:-4], "less data"),
    (lambda: npy_bytes(np.zeros((3072, 8), [("a", "f4")])), "dtype"),
    (lambda: npy_bytes(np.zeros((3072, 8), "c8")), "dtype"),
    (lambda: npy_bytes(np.asfortranarray(np.zeros((3072, 8), np.float32))), "Fortran"),
], ids=["too large", "trailing data", "truncated", "structured", "complex", "Fortran"])
def test_checkpoint_members_must_match_their_headers(tmp_path, ckpt, member, message):
    write_zip(ckpt, {**checkpoint_members(ckpt), "w1.npy": member()})
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.load_checkpoint(ckpt)


def test_duplicate_members_and_huge_meta_are_refused(tmp_path, ckpt):
    members = checkpoint_members(ckpt)
    with zipfile.ZipFile(ckpt, "a") as zf, pytest.warns(UserWarning, match="Duplicate"):
        zf.writestr("b1.npy", members["b1.npy"])
    with pytest.raises(checkpoint.CheckpointError, match="twice"):
        checkpoint.load_checkpoint(ckpt)
    huge = npy_bytes(np.array(json.dumps({"activation": "relu", "x": "y" * (2 * MB)})))
    write_zip(ckpt, {**members, "meta.npy": huge})
    with pytest.raises(checkpoint.CheckpointError, match="meta"):
        checkpoint.load_checkpoint(ckpt)


@pytest.mark.parametrize("chars", [limits.META_CHARS, 1 << 22])
def test_the_largest_meta_of_the_worst_json_stays_within_the_bound(tmp_path, ckpt, chars):
    """Past the list: `meta` may hold a history of 10,000 epochs; a 35 KB checkpoint whose meta
    was 4 Mi characters of [{}, {}, ...] (JSON's worst, 21 times its size) took 172 MB."""
    head = '{"activation": "relu", "class_names": %s, "x": [' % json.dumps(
        data_loader.CLASS_NAMES)
    meta = head + "{}," * ((chars - len(head) - 4) // 3) + "{}]}"
    write_zip(ckpt, {**checkpoint_members(ckpt), "meta.npy": npy_bytes(np.array(meta))})
    report = measured("checkpoint.load_checkpoint", ckpt)
    assert (report["error"] is None) == (chars <= limits.META_CHARS), report
    assert report["maxrss_mb"] < 150, report


def test_a_zip_directory_of_many_entries_is_refused_before_it_is_parsed(tmp_path):
    """Past the list: zipfile holds ~600 bytes per directory entry; 300,000 empty entries
    (26 MB) took 196 MB before this check."""
    path = tmp_path / "many.npy"
    with zipfile.ZipFile(path, "w") as zf:
        for k in range(20_000):
            zf.writestr(str(k), b"")
    with pytest.raises(checkpoint.CheckpointError, match="lists more members than the"):
        checkpoint.load_checkpoint(path)


def test_class_names_must_be_short(tmp_path):
    """Past the list: ten names of 90,000 characters made the plots fail with std::bad_alloc."""
    path = save_model(tmp_path / "best.npy", class_names=["W" * 101] + data_loader.CLASS_NAMES[1:])
    with pytest.raises(checkpoint.CheckpointError, match="names of 1 to 100 characters"):
        checkpoint.load_checkpoint(path)


def test_deeply_nested_meta_is_one_clear_error(tmp_path, ckpt):
    nested = npy_bytes(np.array("[" * 100_000 + "]" * 100_000))
    write_zip(ckpt, {**checkpoint_members(ckpt), "meta.npy": nested})
    with pytest.raises(checkpoint.CheckpointError, match="bad metadata"):
        checkpoint.load_checkpoint(ckpt)


def test_read_archive_serves_another_member_table(tmp_path):
    """The reader is general: a resume-state file with its own members and bounds."""
    table = {"velocity_w1": checkpoint.Member("f", 4096), "rng": checkpoint.Member("U", 1024)}
    path = tmp_path / "state.npz"
    np.savez(path, velocity_w1=np.ones((4, 4)), rng=np.array('{"seed": 1}'))
    arrays = checkpoint.read_archive(path, table, "training state")
    assert arrays["velocity_w1"].sum() == 16 and arrays["velocity_w1"].flags.writeable
    np.savez(path, velocity_w1=np.ones((40, 40)))
    with pytest.raises(cli.Error, match="not a readable training state.*velocity_w1"):
        checkpoint.read_archive(path, table, "training state")
    with pytest.raises(FileNotFoundError):
        checkpoint.read_archive(tmp_path / "absent.npz", table)


def test_extra_arrays_of_a_run_state_are_bounded_by_their_shapes(tmp_path):
    """load_checkpoint(extra_arrays=...) reads a resume state through the same reader: each
    extra array may hold no more than its expected shape, and nothing else may be there."""
    net = model.ThreeLayerNN(12, (5, 4), 3, "tanh", seed=1)
    path = tmp_path / "state.npz"
    checkpoint.save_checkpoint(path, net, np.zeros(12), np.ones(12), ["a", "b", "c"], {},
                          arrays={"velocity_w1": np.zeros((1000, 1000), np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match="velocity_w1 .* more than the 480"):
        checkpoint.load_checkpoint(path, extra_arrays={"velocity_w1": (12, 5)})
    checkpoint.load_checkpoint(path)  # a state is a checkpoint too (velocities bounded as weights)
    checkpoint.save_checkpoint(path, net, np.zeros(12), np.ones(12), ["a", "b", "c"], {},
                          arrays={"momentum_w1": np.zeros((12, 5), np.float32)})
    with pytest.raises(checkpoint.CheckpointError, match="unknown members momentum_w1"):
        checkpoint.load_checkpoint(path)


# --- 4: tar bombs and endless downloads -------------------------------------------------------


def hostile_archive(tmp_path, extra):
    """data/cifar-10-python.tar.gz: a synthetic CIFAR archive plus `extra` (TarInfo, bytes)."""
    make_cifar_dir(tmp_path / "source")
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / cifar10.ARCHIVE, "w:gz", compresslevel=1,
                      format=tarfile.PAX_FORMAT) as tar:
        for info, content in extra:
            tar.addfile(info, io.BytesIO(content))
        tar.add(tmp_path / "source" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    md5 = hashlib.md5((data_dir / cifar10.ARCHIVE).read_bytes()).hexdigest()
    return data_dir, md5


def member(name, size=None, content=b"", **pax):
    info = tarfile.TarInfo(name)
    info.size = len(content) if size is None else size
    info.pax_headers = pax
    return info, content


OVER_MEMBER = limits.ARCHIVE_MEMBER_BYTES + MB
LOAD = "lambda folder, md5: data_loader.load_data(folder, url='http://127.0.0.1:9/', md5=md5)"


@pytest.mark.parametrize("extra, message", [
    (lambda: [member("cifar-10-batches-py/data_batch_1", content=bytes(OVER_MEMBER))], "more than"),
    (lambda: [member("cifar-10-batches-py/unlisted", content=bytes(OVER_MEMBER))], "more than"),
    (lambda: [member("cifar-10-batches-py/readme.html", content=b"x", comment="c" * (60 * MB))],
     "extended header"),
], ids=["batch past the cap", "unlisted member past the cap", "pax header of 60 MB"])
def test_tar_bombs_write_and_hold_little(tmp_path, extra, message):
    """Item 4: a 3 MB archive with a 3 GiB member wrote 3 GB before the fix; a pax header of
    60 MB (past the list) took 3 times that in memory."""
    data_dir, md5 = hostile_archive(tmp_path, extra())
    report = measured(LOAD, data_dir, md5, fsize=limits.ARCHIVE_MEMBER_BYTES + MB)
    assert message in report["error"] and report["maxrss_mb"] < 150, report
    assert os.listdir(data_dir) == [cifar10.ARCHIVE]


def test_only_cifar_files_are_extracted_and_members_are_counted(tmp_path, monkeypatch):
    data_dir, md5 = hostile_archive(tmp_path, [member("cifar-10-batches-py/run.sh", content=b"x"),
                                              member("elsewhere.txt", content=b"x")])
    data_loader.load_data(data_dir, url="http://127.0.0.1:9/", md5=md5)
    assert sorted(os.listdir(data_dir / "cifar-10-batches-py")) == sorted(
        cifar10.TRAIN_FILES + ["test_batch", "batches.meta"])
    many = [member(f"cifar-10-batches-py/{k}", content=b"") for k in range(70)]
    data_dir, md5 = hostile_archive(tmp_path / "many", many)
    with pytest.raises(data_loader.DataError, match="more than 64 members"):
        data_loader.load_data(data_dir, url="http://127.0.0.1:9/", md5=md5)


@pytest.fixture
def endless():
    """An HTTP server whose /zeros never ends, /huge announces 1 TB, and /slow sends 1 MB
    and then waits: returns the base URL."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            if self.path == "/huge":
                self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            try:
                self.wfile.write(bytes(MB))
                while not stop.is_set():
                    if self.path == "/zeros":
                        self.wfile.write(bytes(MB))
                    else:
                        stop.wait(0.05)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    stop.set()
    httpd.shutdown()
    httpd.server_close()


def test_an_endless_download_is_cut_at_the_cap(tmp_path, endless, monkeypatch):
    monkeypatch.setattr(limits, "DOWNLOAD_BYTES", 8 * MB)
    for path in ("/zeros", "/huge"):
        with pytest.raises(data_loader.DataError, match="larger than"):
            data_loader.load_data(tmp_path, url=endless + path, progress=False)
        assert os.listdir(tmp_path) == []


def test_file_urls_must_name_regular_files(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    for url in ("file:///dev/zero", f"file://{tmp_path}/fifo"):
        result = run_child("import data_loader, sys; data_loader.load_data(sys.argv[1], "
                           "url=sys.argv[2], progress=False)", tmp_path, url, timeout=20)
        assert "not a regular file" in result.stderr, result.stderr


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM with a handler"])
def test_a_signal_leaves_no_part_file(tmp_path, endless, how):
    """Item 4: the download's clean-up runs when a signal stops it."""
    handler = ("signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw("
               "KeyboardInterrupt()))" if "SIGTERM" in how else "")
    code = (f"import signal, sys, cifar10\n{handler}\n"
            "cifar10.download(sys.argv[1], sys.argv[2], '0' * 32, progress=False)")
    child = subprocess.Popen([sys.executable, "-c", code, endless + "/slow",
                              tmp_path / cifar10.ARCHIVE], cwd=ROOT,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not any(p.stat().st_size for p in tmp_path.glob("*.part")):
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.05)
    child.send_signal(signal.SIGINT if how == "SIGINT" else signal.SIGTERM)
    _, err = child.communicate(timeout=20)
    assert "KeyboardInterrupt" in err and os.listdir(tmp_path) == []


# --- 6: text from files is escaped before it is printed ---------------------------------------


def test_names_and_paths_are_printed_escaped(tmp_path, capsys):
    hostile = "cat\x1b[2J\nfake: line\x07"
    names = [hostile] + data_loader.CLASS_NAMES[1:]
    path = save_model(tmp_path / "best.npy", class_names=names)
    image = tmp_path / "a\nb\x1b[31m.png"
    Image.new("RGB", (40, 40), "red").save(image)
    with pytest.raises(SystemExit) as exit_info:
        cli.run(evaluate.main, ["--model", str(path), "--image", str(image)])
    out, err = capsys.readouterr()
    assert exit_info.value.code == 0, err
    assert "\x1b" not in out and "\x07" not in out and len(out.splitlines()) == 1, out
    assert out.startswith(cli.shown(str(image))) and "a\\nb\\x1b[31m.png" in out
    table = evaluate.format_table({"per_class": {n: dict(accuracy=0, precision=0, support=0)
                                                 for n in names}})
    assert "\x1b" not in table and "cat\\x1b[2J\\nfake: line\\x07" in table
    assert cli.shown("chat ï 猫 🐱") == "chat ï 猫 🐱"  # ordinary Unicode stays
    assert cli.shown(b"a\xffb") == "a\\udcffb"


def test_error_lines_escape_paths(tmp_path):
    image = tmp_path / "bad\n\x1b]0;title\x07.png"
    image.write_bytes(b"not an image")
    hostile_dir = tmp_path / "d\x1b[31m\n"
    (hostile_dir / "cifar-10-batches-py").mkdir(parents=True)
    (hostile_dir / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x1b[2J")
    for load, path in [(evaluate.load_image, image), (checkpoint.load_checkpoint, image),
                       (checkpoint.load_checkpoint, hostile_dir / "absent"),
                       (data_loader.load_data, hostile_dir)]:
        with pytest.raises(cli.Error) as exc_info:
            load(path)
        assert "\x1b" not in str(exc_info.value) and "\n" not in str(exc_info.value)


# --- 7, 8: image modes and formats ------------------------------------------------------------


def pixel(img):
    """The RGB value test.py sees at the top-left of `img`, converted and uniform."""
    rgb = np.asarray(evaluate.to_rgb(img))
    assert rgb.dtype == np.uint8 and rgb.shape[2] == 3
    return tuple(int(v) for v in rgb[0, 0])


@pytest.mark.parametrize("mode, value, expected", [
    ("I;16", 32896, (128,) * 3),  # mid-grey: was 255 before the fix
    ("I;16", 65535, (255,) * 3),
    ("I;16B", 257 * 200, (200,) * 3),
    ("I;16L", 257 * 10, (10,) * 3),
    ("I", 32896, (128,) * 3),  # 32-bit integers: taken as 16-bit greys, clipped
    ("I", -5, (0,) * 3),
    ("I", 1 << 20, (255,) * 3),
    ("F", 0.5, (128,) * 3),  # was 0 before the fix
    ("F", 1.0, (255,) * 3),
    ("F", 7.0, (255,) * 3),
    ("F", float("nan"), (0,) * 3),
    ("1", 1, (255,) * 3),
    ("L", 77, (77,) * 3),
    ("CMYK", (0, 0, 0, 0), (255,) * 3),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("RGB", (1, 2, 3), (1, 2, 3)),
    ("RGBA", (10, 20, 30, 255), (10, 20, 30)),
    ("RGBA", (10, 20, 30, 0), (255,) * 3),  # transparent: white
    ("LA", (40, 255), (40,) * 3),
    ("LA", (40, 0), (255,) * 3),
    ("YCbCr", (128, 128, 128), (128,) * 3),
])
def test_every_mode_becomes_8_bit_rgb(mode, value, expected):
    assert pixel(Image.new(mode, (3, 3), value)) == pytest.approx(expected, abs=1)


def test_palette_images_with_and_without_transparency():
    img = Image.new("P", (3, 3), 1)
    img.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert pixel(img) == (200, 100, 50)
    img.info["transparency"] = 1
    assert pixel(img) == (255, 255, 255)
    pa = Image.new("PA", (3, 3), (1, 0))
    pa.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    assert pixel(pa) == (255, 255, 255)


def test_16_bit_png_and_float_tiff_files_are_scaled(tmp_path):
    png, tif = tmp_path / "grey16.png", tmp_path / "float.tif"
    Image.fromarray(np.full((8, 8), 32896, np.uint16)).save(png)
    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tif)
    for path in (png, tif):
        assert set(evaluate.load_image(path).tolist()) == {128}, path


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"])
def test_each_allowed_format_is_read(tmp_path, fmt):
    path = tmp_path / f"a.{fmt.lower()}"
    Image.new("RGB", (40, 30), (0, 200, 0)).save(path, fmt)
    image = evaluate.load_image(path).reshape(3, 32, 32)
    assert abs(int(image[1].mean()) - 200) < 8 and image[0].max() < 40


@pytest.mark.parametrize("content", [
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",  # would run Ghostscript
    b"P6\n2 2\n255\n" + bytes(12),  # PPM: readable, but not on the list
])
def test_other_formats_are_refused_before_decoding(tmp_path, content):
    path = tmp_path / "picture.png"
    path.write_bytes(content)
    with pytest.raises(cli.Error, match="not a picture in one of the formats PNG, JPEG"):
        evaluate.load_image(path)


def png_chunk(kind, data):
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_header(width, height):
    """The first bytes of a PNG of that size: enough for a reader to learn its dimensions."""
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"")) + png_chunk(b"IEND", b""))


def test_huge_dimensions_in_a_header_are_refused(tmp_path):
    """Past the list: a 100,000 x 100,000 PNG header is refused before it is decoded."""
    path = tmp_path / "huge.png"
    path.write_bytes(png_header(100_000, 100_000))
    with pytest.raises(cli.Error, match="exceeds limit"):
        evaluate.load_image(path)


def test_big_pictures_are_shrunk_before_conversion(tmp_path):
    """Past the list: a 200 KB 16-bit PNG of 49 megapixels took 1.1 GB before the fix."""
    path = tmp_path / "big16.png"
    Image.fromarray(np.full((7000, 7000), 30000, np.uint16)).save(path, compress_level=1)
    report = measured("load_script('test').load_image", path)
    assert report["error"] is None and report["maxrss_mb"] < 450, report
    path.write_bytes(png_header(8000, 8000))
    with pytest.raises(cli.Error, match="more than the 50000000"):
        evaluate.load_image(path)


# --- 9: FIFOs, devices, folders ---------------------------------------------------------------


def test_fifos_devices_and_folders_are_refused_not_waited_on(tmp_path, ckpt):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "zero.npy").symlink_to("/dev/zero")
    for bad in (fifo, tmp_path / "zero.npy", tmp_path):
        result = run_script("test.py", "--model", bad, "--image", "x.png", timeout=20)
        assert_one_error_line(result, "not a regular file")
    result = run_script("test.py", "--model", ckpt, "--image", fifo, timeout=20)
    assert_one_error_line(result, "not a regular file but a FIFO")
    for bad in (tmp_path / "zero.npy", tmp_path):
        with pytest.raises(cli.Error, match="not a regular file"):
            evaluate.load_image(bad)
    make_cifar_dir(tmp_path / "data")
    batch = tmp_path / "data" / "cifar-10-batches-py" / "data_batch_1"
    batch.unlink()
    os.mkfifo(batch)
    result = run_child("import data_loader, sys; data_loader.load_data(sys.argv[1])",
                       tmp_path / "data", timeout=20)
    assert "not a regular file but a FIFO" in result.stderr


def test_a_fifo_as_history_is_refused(tmp_path, ckpt):
    os.mkfifo(tmp_path / "history.json")
    with pytest.raises(cli.Error, match="not a regular file"):
        utils.load_history(tmp_path / "history.json")


@pytest.mark.parametrize("content", [
    '{"epochs": [{"epoch": 1e308, "val_acc": 0.5}]}',  # was a bare ValueError from arange
    '{"epochs": [{"epoch": 1, "train_loss": "abc"}]}',
    '{"epochs": [[]]}',
    '{"epochs": ' + "[" * 100_000 + "]" * 100_000 + "}",
    b'{"epochs": "\xff"}',
    '{"epochs": [{"epoch": 1, "val_acc": Infinity}]}',  # past the list: arange failed
    '{"epochs": [{"epoch": 1, "train_loss": 1' + "0" * 400 + '}]}',  # and OverflowError
])
def test_a_hostile_history_is_one_clear_error(tmp_path, content):
    path = tmp_path / "history.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(cli.Error, match="cannot read training history"):
        utils.load_history(path)


# --- 10: non-finite outputs -------------------------------------------------------------------


@pytest.mark.parametrize("change", [dict(std=1e-45), dict(scale=1e30)])
def test_non_finite_outputs_are_one_error(tmp_path, change):
    """Item 10: these printed `truck nan, ship nan, ...` with exit 0 and warnings before."""
    path = save_model(tmp_path / "best.npy", **change)
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(image)
    result = run_script("test.py", "--model", path, "--image", image)
    assert_one_error_line(result, "not finite")
    assert "Warning" not in result.stderr and "nan" not in result.stdout


def test_a_model_of_another_class_count_is_refused_for_cifar(tmp_path):
    """Past the list: 100,000 outputs (a 1 MB checkpoint) asked for a confusion matrix of
    10^10 cells; 20 shows it without the harm."""
    net = model.ThreeLayerNN(3072, (8, 8), 20, "relu", seed=0)
    path = tmp_path / "best.npy"
    checkpoint.save_checkpoint(path, net, np.zeros(3072), np.ones(3072), [str(k) for k in range(20)],
                          {})
    make_cifar_dir(tmp_path / "data")
    result = run_script("test.py", "--model", path, "--data-dir", tmp_path / "data",
                        "--out-dir", tmp_path / "out")
    assert_one_error_line(result, "20 classes, not the 10 of CIFAR-10")


# --- 11: the data folder ----------------------------------------------------------------------


def test_a_batch_folder_that_is_a_file_is_named_not_downloaded(tmp_path):
    (tmp_path / "cifar-10-batches-py").write_text("oops")
    with pytest.raises(data_loader.DataError, match="is a file, not a folder"):
        data_loader.load_data(tmp_path, url="http://127.0.0.1:9/")
    assert os.listdir(tmp_path) == ["cifar-10-batches-py"]


def test_an_unreadable_data_folder_is_a_clear_error(tmp_path):
    """As root, the child runs without the capabilities that bypass file permissions."""
    make_cifar_dir(tmp_path / "data")
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop root's file-permission override")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    code = "import cli, data_loader; cli.run(lambda argv: data_loader.load_data(argv[0]))"
    for unreadable in (tmp_path / "data", tmp_path / "data" / "cifar-10-batches-py"):
        os.chmod(unreadable, 0)
        try:
            result = subprocess.run([*prefix, sys.executable, "-c", code, tmp_path / "data"],
                                    cwd=ROOT, text=True, capture_output=True, timeout=60)
        finally:
            os.chmod(unreadable, 0o755)
        assert_one_error_line(result, "data folder", "ermission denied")
        assert "PermissionError" not in result.stderr


# --- issue 24: one memory budget for the batch unpickler --------------------------------------


def shared_list_labels(k=7000):
    """Item 1: labels that are k references to one list of k zeros (k² values, 31 KB)."""
    return pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"labels": [[0] * k] * k},
                        protocol=2)


def arrays_over_one_buffer(n=40):
    """Item 1: n arrays built from one memoised 30 MB bytes object (each was a copy)."""
    data = bytes(10_000 * 3072)
    arrays = [crafted_array(("u1", False, True), (3, "|", None, None, None, -1, -1, 0),
                            (10_000, 3072), data) for _ in range(n)]
    return pickle.dumps({b"data": arrays[0], b"others": arrays}, protocol=3)


def one_text_encoded_often(n=40):
    """Item 1: one memoised 10 MB text that _codecs.encode turns into bytes n times."""
    text = "\xff" * (10 << 20)
    return pickle.dumps([Reduced(codecs.encode, (text, "latin1")) for _ in range(n)], protocol=2)


def dtype_state_graph(k=9000):
    """Past the list: a dtype state whose repr, once put in the error message, was k² long."""
    return pickle.dumps(Reduced(np.dtype, ("u1", False, True), [[0] * k] * k), protocol=2)


BATCH_BOMBS = {
    "labels: k references to one list": shared_list_labels,
    "arrays over one buffer": arrays_over_one_buffer,
    "one text encoded often": one_text_encoded_often,
    "a dtype state with a huge repr": dtype_state_graph,
    "empty sets": lambda: b"\x80\x04" + b"\x8f" * (8 << 20) + b".",  # was 1.9 GB for 8 MB
    "a memo index of 2**26": lambda: b"\x80\x02]r\xff\xff\xff\x03.",  # a memo of 1 GB
    # 38 MB of escapes of an emoji: CPython's decoder held 38 M characters of 4 bytes
    "a text of wide escapes": lambda: b"V" + b"\\U0001f600" * 3_800_000 + b"\n.",
}


@pytest.mark.parametrize("bomb", BATCH_BOMBS)
def test_batch_bombs_stay_within_the_unpicklers_budget(tmp_path, bomb):
    """Item 1: whatever a batch file says, reading it takes at most twice its size plus
    limits.UNPICKLED_BYTES (and the interpreter's 64 MB); most bombs are refused before
    anything is built, and take less than 150 MB."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(BATCH_BOMBS[bomb]())
    bound = 64 + (2 * path.stat().st_size + limits.UNPICKLED_BYTES) / MB
    if bomb != "one text encoded often":  # the one that builds up to the budget
        bound = 150
    report = measured("cifar10.read_batch", path)
    assert "data_batch_1" in report["error"] and report["maxrss_mb"] < bound, report


def test_dict_keys_that_share_a_hash_are_refused_at_once(tmp_path):
    """Past the list: 100,000 ints that all hash alike, as one dict's keys (1.2 MB, well
    within the budget), took minutes to insert, each slower than the last."""
    def long1(value):
        data = value.to_bytes(value.bit_length() // 8 + 1, "little", signed=True)
        return b"\x8a" + bytes([len(data)]) + data

    keys = (long1(k * ((1 << 61) - 1)) + b"N" for k in range(1, 100_001))
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x02}(" + b"".join(keys) + b"u.")
    result = run_child("import cli, cifar10, sys; cli.run(lambda argv: "
                       "cifar10.read_batch(argv[0]))", path, timeout=20)
    assert_one_error_line(result, "more than the 1024 dict and set entries")


def test_a_full_batch_repickled_with_protocol_2_is_read_within_the_bound(tmp_path):
    """Issue 23, item 3: NumPy 2 with protocol 2 writes a test batch of 44.7 MB, which the
    40 MB cap refused. The cap follows 10,000 images in any protocol (limits.py)."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10_000, 3072), np.uint8), np.arange(10_000) % 10
    path = tmp_path / "test_batch"
    path.write_bytes(conftest.batch_bytes(images, labels, protocol=2, legacy=False))
    assert path.stat().st_size > 44 * MB
    report = measured("cifar10.read_batch", path)
    bound = 64 + (2 * path.stat().st_size + limits.UNPICKLED_BYTES) / MB
    assert report["error"] is None and report["maxrss_mb"] < bound, report


@pytest.mark.parametrize("protocol", range(6))
def test_the_batch_limits_hold_10000_images_in_any_protocol(protocol):
    """The cap and the budget are derived, not guessed: the worst images (all 0: six-byte
    escapes in protocol 0; all 255: two UTF-8 bytes in 1 and 2) with NumPy int labels and
    50-character names fit them, image for image."""
    n = 100
    for value in (0, 255):
        batch = {b"labels": [np.int64(k % 10) for k in range(n)],
                 b"data": np.full((n, 3072), value, np.uint8),
                 b"filenames": [b"%050d" % k for k in range(n)]}
        raw = pickle.dumps(batch, protocol=protocol)
        per_image = (len(raw) - (64 << 10)) / n
        assert per_image * limits.IMAGES_PER_BATCH <= limits.BATCH_FILE_BYTES
        unpickler = cifar10._BatchUnpickler(raw, "batch")
        unpickler.load()
        assert unpickler.spent / n * limits.IMAGES_PER_BATCH <= limits.UNPICKLED_BYTES


def test_a_huge_bytearray_length_is_one_clear_error(tmp_path):
    """Item 13: CPython printed `SystemError: ... exported buffers` before the error."""
    path = tmp_path / "data_batch_1"
    path.write_bytes(b"\x80\x05\x96" + (1 << 40).to_bytes(8, "little") + b"x" * 100 + b".")
    result = run_child("import cli, cifar10, sys; cli.run(lambda argv: "
                       "cifar10.read_batch(argv[0]))", path)
    assert_one_error_line(result, "data_batch_1", "runs past the end")


# --- issue 24: one escape for text from files --------------------------------------------------

MATH_AND_ESCAPES = "$\x1b]0;owned\x07\\foo$"


@pytest.mark.parametrize("script", ["test", "utils"])
def test_class_names_with_math_text_and_escapes_are_drawn_literally(tmp_path, script):
    """Item 7: such a class name made test.py and utils.py die while plotting, with the raw
    sequence in the error, and test.py never wrote test_metrics.json."""
    model_path = save_model(tmp_path / "best.npy",
                            class_names=[MATH_AND_ESCAPES, "$x$"] + data_loader.CLASS_NAMES[2:])
    make_cifar_dir(tmp_path / "data")
    result = run_script(f"{script}.py", "--model", model_path, "--data-dir", tmp_path / "data",
                        "--out-dir", tmp_path / "out")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert (tmp_path / "out" / "confusion_matrix.png").exists()
    if script == "test":
        assert json.loads((tmp_path / "out" / "test_metrics.json").read_text())["class_names"][0] \
            == MATH_AND_ESCAPES


def test_unexpected_errors_are_escaped_too(capsys):
    """Item 7: cli.run's line for an unexpected exception printed its message raw."""
    def main(argv):
        raise ValueError(f"bad \x1b[2J{MATH_AND_ESCAPES}")

    with pytest.raises(SystemExit):
        cli.run(main, [])
    err = capsys.readouterr().err
    assert err.startswith("error: ValueError: bad \\x1b[2J") and err[:-1].isprintable(), err


def test_a_space_file_value_is_echoed_escaped(tmp_path):
    """Item 7: a --space-file value was echoed raw in its error line."""
    space = tmp_path / "space.json"
    space.write_text(json.dumps({"activation": ["relu\x1b]0;owned\x07"]}))
    result = run_script("hyperparam_tuning.py", "--space-file", space, "--data-dir", tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].isprintable(), result.stderr
    assert "\\x1b]0;owned\\x07" in lines[0]


# --- issue 24: pictures ------------------------------------------------------------------------


def tiled_tiff(side, tile, payload=zlib.compress(b"\x80" * 256)):
    """A deflate-compressed grey TIFF of side x side pixels in tiles of tile x tile."""
    entries = sorted([(256, 3, 1, side), (257, 3, 1, side), (258, 3, 1, 8), (259, 3, 1, 8),
                      (262, 3, 1, 1), (277, 3, 1, 1), (322, 3, 1, tile), (323, 3, 1, tile),
                      (324, 4, 1, 300), (325, 4, 1, len(payload))])
    ifd = (len(entries).to_bytes(2, "little") + b"".join(
        b"".join(v.to_bytes(n, "little") for v, n in zip(e, (2, 2, 4, 4))) for e in entries)
        + bytes(4))
    head = b"II*\0" + (8).to_bytes(4, "little") + ifd
    return head + bytes(300 - len(head)) + payload


def test_a_tiff_of_huge_tiles_is_refused_before_decoding(tmp_path):
    """Item 5: 16x16 pixels in tiles of 26,752² took 2.2 GB (715 MB as grey)."""
    path = tmp_path / "tiles.tif"
    path.write_bytes(tiled_tiff(16, 26_752))
    report = measured("load_script('test').load_image", path)
    assert "tiles of 26752x26752 pixels" in report["error"] and report["maxrss_mb"] < 150, report


@pytest.mark.parametrize("mode", ["P", "RGBA"])
def test_50_megapixels_of_any_mode_stay_within_the_bound(tmp_path, mode):
    """Item 12: a palette picture with transparency took 709 MB, RGBA 456 MB, over the
    documented bound; they are now shrunk a band at a time."""
    path = tmp_path / "big.png"
    img = Image.new(mode, (7000, 7000), 3 if mode == "P" else (10, 20, 30, 128))
    if mode == "P":
        img.putpalette([0, 0, 0, 200, 100, 50] * 128)
    img.save(path, compress_level=1, **({"transparency": 1} if mode == "P" else {}))
    report = measured("load_script('test').load_image", path)
    assert report["error"] is None and report["maxrss_mb"] < 300, report


def test_a_broken_png_chunk_is_one_line_naming_the_file(tmp_path, ckpt):
    """Item 13: it was `error: SyntaxError: broken PNG file`, with no file named."""
    path = tmp_path / "broken.png"
    Image.new("RGB", (40, 40), "red").save(path)
    raw = path.read_bytes()
    at = raw.index(b"IDAT") - 4
    data = raw[at + 8:at + 8 + int.from_bytes(raw[at:at + 4], "big")]
    chunks = [png_chunk(b"IDAT", data[:10]), png_chunk(b"\xff\xffAT", data[10:])]  # not a type
    path.write_bytes(raw[:at] + b"".join(chunks) + raw[at + 12 + len(data):])
    result = run_script("test.py", "--model", ckpt, "--image", path)
    assert_one_error_line(result, "cannot read image", str(path))


@pytest.mark.parametrize("picture", ["libtiff warning", "float overflow"])
def test_decoders_and_numpy_print_nothing_of_their_own(tmp_path, ckpt, picture):
    """Item 13: libtiff's warnings and NumPy's RuntimeWarning reached stderr."""
    path = tmp_path / "picture.tif"
    if picture == "libtiff warning":  # too little data: libtiff says so on stderr
        path.write_bytes(tiled_tiff(1024, 1024))
    else:
        Image.fromarray(np.full((8, 8), 3e38, np.float32)).save(path)
    result = run_script("test.py", "--model", ckpt, "--image", path)
    if picture == "libtiff warning":
        assert_one_error_line(result, "cannot read image", str(path))
    else:
        assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_history_takes_little_memory_whatever_it_holds(tmp_path):
    """Item 12: a 64 MB history.json (the limit then) took 1.8 GB; the limit now holds 10,000
    epochs as train.py writes them, and the worst JSON of that size (empty objects, 21 times
    its size) takes under 120 MB more than reading a one-epoch history."""
    def peak(path, size):
        path.write_text('{"epochs": [' + "{}," * ((size - 16) // 3) + "{}]}")
        return measured("load_script('utils').load_history", path)

    small, largest, over = (peak(tmp_path / f"{size}.json", size)
                            for size in (64, limits.HISTORY_BYTES, 60 << 20))
    assert "more than the" in over["error"] and over["maxrss_mb"] < small["maxrss_mb"] + 20
    assert largest["maxrss_mb"] < small["maxrss_mb"] + 120, (small, largest)


def test_extreme_weights_draw_without_numpy_warnings(tmp_path):
    """Past the list: the first layer as seen from the pixels overflowed float32 in utils.py,
    and NumPy's RuntimeWarning reached stderr."""
    net = model.ThreeLayerNN(16, (8, 8), 10, "relu", seed=0)
    net.w1 = net.w1 * np.float32(3e37)
    prep = data_loader.Preprocessing(np.full(3072, 120, np.float32),
                                     np.full(3072, 60, np.float32),
                                     np.full((3072, 16), 3e37, np.float32))
    checkpoint.save_model(tmp_path / "best.npy", net, prep, {"flip_average": False})
    make_cifar_dir(tmp_path / "data")
    result = run_script("utils.py", "--model", tmp_path / "best.npy", "--data-dir",
                        tmp_path / "data", "--out-dir", tmp_path / "out")
    assert_one_error_line(result, "not finite")
    assert (tmp_path / "out" / "weights.png").exists()
