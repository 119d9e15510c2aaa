"""data_loader.py: safe download and extraction, safe reading of batch files, and serving.

Everything runs on tiny synthetic data and a local HTTP server; the test on the real
CIFAR-10 folder skips when it is absent.
"""
import hashlib
import http.server
import os
import pickle
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

import cifar10
import data_loader
from conftest import batch_bytes, make_archive, make_cifar_dir
from data_loader import DataError

pytestmark = pytest.mark.timeout(60)

REAL_DATA = Path(__file__).resolve().parent.parent / "data" / "cifar-10-batches-py"


@pytest.fixture(autouse=True)
def no_proxy_no_mirror(monkeypatch):
    """Reach the local server directly, and start from the default URL and checksum."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("CIFAR10_URL", raising=False)
    monkeypatch.delenv("CIFAR10_MD5", raising=False)


@pytest.fixture
def server():
    """A threaded HTTP server on 127.0.0.1: serve(path, body, mode) returns the URL.

    mode "ok" sends the body; "drop" announces its full length, sends half and hangs up;
    "stall" sends the headers and then nothing.
    """
    routes, release = {}, threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path not in routes:
                self.send_error(404)
                return
            body, mode = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mode == "stall":
                release.wait(20)
                return
            self.wfile.write(body if mode == "ok" else body[:len(body) // 2])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()

    def serve(path, body, mode="ok"):
        routes[path] = body, mode
        return f"http://127.0.0.1:{httpd.server_address[1]}{path}"

    yield serve
    release.set()
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def archive(tmp_path):
    """Build a synthetic archive: archive(extra=()) -> (bytes, md5, expected arrays)."""
    def build(extra=()):
        source = tmp_path / "source"
        expected = make_cifar_dir(source)
        path = make_archive(tmp_path / "built.tar.gz", source, extra)
        body = path.read_bytes()
        return body, hashlib.md5(body).hexdigest(), expected

    return build


def dead_url():
    """A URL on a local port where nothing listens: like having no network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"


def assert_same(loaded, expected):
    for got, want in zip(loaded, expected, strict=True):
        assert got.dtype == (np.uint8 if got.ndim == 2 else np.int64)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


# --- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("style", [
    dict(keys="bytes", legacy=True, protocol=3),  # as the official files load: bytes keys
    dict(keys="bytes", legacy=False, protocol=2),  # Python 3, protocol 2: bytes via _codecs
    dict(keys="str", legacy=True, protocol=2),
    dict(keys="str", legacy=False, protocol=4),
    dict(keys="str", legacy=False, protocol=4, numpy_labels=True),  # as re-saved by Python 3
])
def test_reads_the_official_layout_with_bytes_or_str_keys(tmp_path, style):
    expected = make_cifar_dir(tmp_path, n_per_batch=30, **style)
    assert_same(data_loader.load_data(tmp_path, url=dead_url()), expected)


class RunsCode:
    """A pickle payload that runs code when loaded: it creates `marker`."""

    def __init__(self, how, marker):
        self.how, self.marker = how, str(marker)

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch '{self.marker}'",)
        return open, (self.marker, "w")


@pytest.mark.parametrize("how, refused", [("system", "posix.system"), ("open", "io.open")])
def test_a_batch_that_would_run_code_is_refused(cifar_dir, tmp_path, how, refused):
    path = cifar_dir / "cifar-10-batches-py" / "data_batch_2"
    raw = pickle.dumps({b"data": RunsCode(how, tmp_path / "marker"), b"labels": [0]}, protocol=3)
    path.write_bytes(raw)
    with pytest.raises(DataError, match=f"data_batch_2.*{refused}.*refused"):
        data_loader.load_data(cifar_dir)
    assert not (tmp_path / "marker").exists()
    pickle.loads(pickle.dumps(RunsCode(how, tmp_path / "control")))  # the payload is live:
    assert (tmp_path / "control").exists()  # plain pickle would have run it


def _rewrite(path, **changes):
    """Rewrite one batch file with some of its fields changed."""
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data, labels = batch[b"data"], batch[b"labels"]
    path.write_bytes(batch_bytes(changes.get("data", data), changes.get("labels", labels)))


@pytest.mark.parametrize("damage, message", [
    ("truncate", "damaged"),
    ("delete", "cannot read"),
    ("garbage", "damaged"),
    ("not a dict", "holds a list"),
    ("wide", r"shape \(N, 3072\)"),
    ("float", "uint8"),
    ("label 10", "0-9"),
    ("label -1", "0-9"),
    ("fewer labels", "'labels' should be 20 integers"),
    ("smaller batch", "holds 10 images but .*data_batch_1 holds 20"),
])
def test_a_damaged_batch_is_named(tmp_path, damage, message):
    data_dir = tmp_path / "data"
    images, labels, _, _ = make_cifar_dir(data_dir)
    path = data_dir / "cifar-10-batches-py" / "data_batch_3"
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[:len(raw) // 2])
    elif damage == "delete":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"\x80\x03not a pickle at all" * 10)
    elif damage == "not a dict":
        path.write_bytes(pickle.dumps([1, 2, 3]))
    elif damage == "wide":
        _rewrite(path, data=np.zeros((20, 3073), np.uint8))
    elif damage == "float":
        _rewrite(path, data=np.zeros((20, 3072), np.float32))
    elif damage.startswith("label"):
        _rewrite(path, labels=[int(damage.split()[1])] * 20)
    elif damage == "fewer labels":
        _rewrite(path, labels=[0] * 19)
    elif damage == "smaller batch":
        _rewrite(path, data=images[:10], labels=labels[:10])
    with pytest.raises(DataError, match=f"data_batch_3.*{message}|{message}.*data_batch_3"):
        data_loader.load_data(data_dir)


# --- obtaining the data ----------------------------------------------------------------------


def test_an_existing_folder_is_used_without_network(tmp_path):
    expected = make_cifar_dir(tmp_path / "data")
    assert_same(data_loader.load_data(tmp_path / "data", url=dead_url()), expected)


def test_download_extract_and_load(tmp_path, server, archive):
    body, md5, expected = archive()
    data_dir = tmp_path / "data"
    url = server("/cifar.tar.gz", body)
    assert_same(data_loader.load_data(data_dir, url=url, md5=md5, progress=True), expected)
    assert sorted(os.listdir(data_dir)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert_same(data_loader.load_data(data_dir, url=dead_url()), expected)  # no second download


def test_mirror_and_checksum_from_the_environment(tmp_path, server, archive, monkeypatch):
    body, md5, expected = archive()
    monkeypatch.setenv("CIFAR10_URL", server("/mirror.tar.gz", body))
    monkeypatch.setenv("CIFAR10_MD5", md5.upper())
    assert_same(data_loader.load_data(tmp_path / "data", progress=False), expected)


def test_the_official_checksum_is_the_default(tmp_path, server, archive):
    body, _, _ = archive()
    with pytest.raises(DataError, match=f"expected {cifar10.MD5}.*CIFAR10_MD5"):
        data_loader.load_data(tmp_path, url=server("/x.tar.gz", body), progress=False)


def test_a_wrong_checksum_leaves_nothing_behind(tmp_path, server, archive):
    body, md5, _ = archive()
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="MD5 .* expected 0{32}.*discarded"):
        data_loader.load_data(data_dir, url=server("/x.tar.gz", body), md5="0" * 32,
                              progress=False)
    assert os.listdir(data_dir) == []


def test_a_dropped_connection_leaves_nothing_and_the_next_run_recovers(tmp_path, server,
                                                                      archive):
    body, md5, expected = archive()
    data_dir, url = tmp_path / "data", server("/x.tar.gz", body, mode="drop")
    with pytest.raises(DataError, match=f"stopped after {len(body) // 2} of {len(body)} bytes"):
        data_loader.load_data(data_dir, url=url, md5=md5, progress=False)
    assert os.listdir(data_dir) == []
    server("/x.tar.gz", body)
    assert_same(data_loader.load_data(data_dir, url=url, md5=md5, progress=False), expected)


def test_a_stalled_server_times_out(tmp_path, server, archive, monkeypatch):
    body, md5, _ = archive()
    monkeypatch.setattr(cifar10, "TIMEOUT", 0.3)
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="cannot download .*timed out"):
        data_loader.load_data(data_dir, url=server("/x.tar.gz", body, mode="stall"), md5=md5,
                              progress=False)
    assert os.listdir(data_dir) == []


def test_http_errors_are_reported(tmp_path, server):
    url = server("/other", b"")
    with pytest.raises(DataError, match="HTTP Error 404"):
        data_loader.load_data(tmp_path, url=url.replace("/other", "/missing"), progress=False)
    assert os.listdir(tmp_path) == []


def test_without_network_the_error_says_where_to_put_the_archive(tmp_path):
    data_dir = tmp_path / "data"
    with pytest.raises(DataError) as info:
        data_loader.load_data(data_dir, url=dead_url(), progress=False)
    message = str(info.value)
    assert str(data_dir / "cifar-10-python.tar.gz") in message and cifar10.URL in message
    assert "\n" not in message
    assert os.listdir(data_dir) == []


def test_leftovers_of_a_killed_run_are_never_taken_for_data(tmp_path, archive):
    body, md5, _ = archive()
    data_dir = tmp_path / "data"
    part = data_dir / ".cifar-10-python.tar.gz.abc123.part"  # complete, yet never used
    extracted = data_dir / ".cifar-10-extract-abc123"
    data_dir.mkdir()
    part.write_bytes(body)
    make_cifar_dir(extracted)
    with pytest.raises(DataError, match="cannot download"):
        data_loader.load_data(data_dir, url=dead_url(), md5=md5, progress=False)
    assert part.exists() and extracted.exists()  # recent: perhaps another run's, kept
    for path in (part, extracted):
        os.utime(path, (0, 0))
    with pytest.raises(DataError, match="cannot download"):
        data_loader.load_data(data_dir, url=dead_url(), md5=md5, progress=False)
    assert os.listdir(data_dir) == []  # old: deleted


def test_an_archive_placed_by_hand_is_verified_and_used(tmp_path, archive):
    body, md5, expected = archive()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "cifar-10-python.tar.gz").write_bytes(body)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz has MD5 .*delete it"):
        data_loader.load_data(data_dir, url=dead_url(), progress=False)
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]  # the user's file is kept
    assert_same(data_loader.load_data(data_dir, url=dead_url(), md5=md5), expected)


def test_a_damaged_archive_is_reported(tmp_path, server):
    body = b"\x1f\x8b" + os.urandom(1000)
    with pytest.raises(DataError, match="cannot extract .*delete it"):
        data_loader.load_data(tmp_path, url=server("/x.tar.gz", body),
                              md5=hashlib.md5(body).hexdigest(), progress=False)
    assert os.listdir(tmp_path) == ["cifar-10-python.tar.gz"]


def _member(name, kind=tarfile.REGTYPE, linkname=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize("members, message", [
    ([(_member("../evil"), b"x")], "'../evil' would land outside"),
    ([(_member("cifar-10-batches-py/../../evil"), b"x")], "would land outside"),
    ([(_member("ABSOLUTE"), b"x")], "would land outside"),
    ([(_member("cifar-10-batches-py/up", tarfile.SYMTYPE, "../.."), None),
      (_member("cifar-10-batches-py/up/evil"), b"x")], "'cifar-10-batches-py/up' is a link"),
    ([(_member("cifar-10-batches-py/abs", tarfile.SYMTYPE, "ABSOLUTE"), None)], "is a link"),
    ([(_member("cifar-10-batches-py/hard", tarfile.LNKTYPE, "ABSOLUTE"), None)], "is a link"),
    ([(_member("cifar-10-batches-py/null", tarfile.CHRTYPE), None)], "is a special file"),
    ([(_member("cifar-10-batches-py/fifo", tarfile.FIFOTYPE), None)], "is a special file"),
])
def test_hostile_archive_members_are_refused(tmp_path, server, archive, members, message):
    outside = tmp_path / "outside" / "evil"  # what ABSOLUTE stands for
    outside.parent.mkdir()
    for info, _ in members:
        info.name = info.name.replace("ABSOLUTE", str(outside))
        info.linkname = info.linkname.replace("ABSOLUTE", str(outside))
    body, md5, _ = archive(members)
    data_dir = tmp_path / "deep" / "data"  # so that ../../evil stays inside tmp_path
    with pytest.raises(DataError, match=f"refused .*{message.replace('ABSOLUTE', '')}"):
        data_loader.load_data(data_dir, url=server("/x.tar.gz", body), md5=md5, progress=False)
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]  # no folder, no temporary one
    assert os.listdir(tmp_path / "deep") == ["data"]
    assert not outside.exists() and not (tmp_path / "evil").exists()


# --- serving ---------------------------------------------------------------------------------


def synthetic(n=600, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    return images, rng.permutation(np.arange(n) % 10)


def test_split_is_stratified_seeded_and_a_partition():
    images, labels = synthetic()
    train_x, train_y, val_x, val_y = data_loader.split_validation(images, labels, 100, seed=0)
    assert train_x.shape == (500, 3072) and val_x.shape == (100, 3072)
    assert np.bincount(val_y, minlength=10).tolist() == [10] * 10
    # Every image lands in exactly one part, with its own label.
    rows = {row.tobytes(): y for row, y in zip(images, labels)}
    parts = [(row.tobytes(), y) for x, ys in ((train_x, train_y), (val_x, val_y))
             for row, y in zip(x, ys)]
    assert sorted(parts) == sorted(rows.items())
    again = data_loader.split_validation(images, labels, 100, seed=0)
    other = data_loader.split_validation(images, labels, 100, seed=1)
    np.testing.assert_array_equal(again[2], val_x)
    assert not np.array_equal(other[2], val_x)


def test_split_shares_remainders_and_refuses_impossible_sizes():
    images, labels = synthetic(n=100)
    labels = np.repeat(np.arange(10), [30, 20, 10, 10, 5, 5, 5, 5, 5, 5])
    _, _, _, val_y = data_loader.split_validation(images, labels, 13, seed=3)
    counts = np.bincount(val_y, minlength=10)
    # Shares 3.9, 2.6, 1.3, 1.3, 0.65 x 6: the 6 left over go to the largest fractions.
    assert counts[:4].tolist() == [4, 2, 1, 1] and sorted(counts[4:]) == [0, 1, 1, 1, 1, 1]
    for size in (0, 100, 101):
        with pytest.raises(DataError, match="val-size"):
            data_loader.split_validation(images, labels, size)


def test_statistics_come_from_the_training_split():
    images, labels = synthetic()
    train_x, _, _, _ = data_loader.split_validation(images, labels, 100, seed=0)
    mean, std = data_loader.compute_stats(train_x)
    assert mean.dtype == std.dtype == np.float32 and mean.shape == std.shape == (3072,)
    np.testing.assert_allclose(mean, train_x.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(std, train_x.std(axis=0), rtol=1e-5)
    full_mean, _ = data_loader.compute_stats(images)
    assert not np.allclose(mean, full_mean)
    small_chunks = data_loader.compute_stats(train_x, chunk_size=7)
    np.testing.assert_array_equal(small_chunks[0], mean)
    np.testing.assert_array_equal(small_chunks[1], std)


def test_a_constant_pixel_gets_unit_std():
    images, _ = synthetic(n=50)
    images[:, 5] = 7
    mean, std = data_loader.compute_stats(images)
    assert mean[5] == 7 and std[5] == 1
    assert np.isfinite(data_loader.normalize(images, mean, std)).all()


def test_normalize_matches_the_formula_and_fills_the_buffer():
    images, _ = synthetic(n=128)
    mean, std = data_loader.compute_stats(images)
    expected = (images.astype(np.float64) - mean) / std
    x = data_loader.normalize(images, mean, std)
    assert x.dtype == np.float32 and x.shape == images.shape
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)
    for dtype in (np.float32, np.float64):
        buffer = np.empty(images.shape, dtype)
        assert data_loader.normalize(images, mean, std, out=buffer) is buffer
        np.testing.assert_allclose(buffer, expected, rtol=1e-5, atol=1e-5)


def shifted(image, dy, dx):
    """Reference shift of a (3, 32, 32) image: down by dy, right by dx, zeros coming in."""
    out = np.roll(image, (dy, dx), axis=(1, 2))
    out[:, :dy] = 0 if dy > 0 else out[:, :dy]
    out[:, dy:] = 0 if dy < 0 else out[:, dy:]
    out[:, :, :dx] = 0 if dx > 0 else out[:, :, :dx]
    out[:, :, dx:] = 0 if dx < 0 else out[:, :, dx:]
    return out


def matches(original, augmented, flip, translate):
    """Each augmented image's (flipped, dy, dx), or None where no candidate explains it."""
    found = []
    for a, b in zip(original.reshape(-1, 3, 32, 32), augmented.reshape(-1, 3, 32, 32)):
        hits = [(f, dy, dx) for f in ({False, flip}) for dy in range(-translate, translate + 1)
                for dx in range(-translate, translate + 1)
                if np.array_equal(shifted(a[:, :, ::-1] if f else a, dy, dx), b)]
        found.append(hits[0] if len(hits) == 1 else None)
    return found


def test_flip_gives_each_image_or_its_mirror():
    images, _ = synthetic(n=64)
    before = images.copy()
    out = data_loader.augment(images, np.random.default_rng(0), flip=True, translate=0)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(images, before)  # a copy: the input is untouched
    found = matches(images, out, flip=True, translate=0)
    assert None not in found and {f for f, _, _ in found} == {False, True}
    same = data_loader.augment(images, np.random.default_rng(0), flip=False, translate=0)
    np.testing.assert_array_equal(same, images)
    assert same is not images


@pytest.mark.parametrize("flip", [False, True])
def test_translate_shifts_each_image_with_zero_fill(flip):
    images, _ = synthetic(n=300)
    before = images.copy()
    out = data_loader.augment(images, np.random.default_rng(1), flip=flip, translate=2)
    assert out.dtype == np.uint8 and out.shape == images.shape
    np.testing.assert_array_equal(images, before)
    found = matches(images, out, flip=flip, translate=2)
    assert None not in found  # every image, in its place, is a shift (and mirror) of itself
    assert len({(dy, dx) for _, dy, dx in found}) == 25
    assert {f for f, _, _ in found} == ({False, True} if flip else {False})


def test_a_pixel_moves_by_the_shift():
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, 1, 10, 20] = 255  # green, row 10, column 20
    images = np.repeat(image.reshape(1, 3072), 200, axis=0)
    out = data_loader.augment(images, np.random.default_rng(2), flip=False, translate=3)
    where = [np.argwhere(o.reshape(3, 32, 32)) for o in out]
    assert all(len(w) == 1 and w[0][0] == 1 for w in where)
    moves = {(w[0][1] - 10, w[0][2] - 20) for w in where}
    assert moves == {(dy, dx) for dy in range(-3, 4) for dx in range(-3, 4)}


def test_a_pixel_shifted_out_leaves_zeros():
    image = np.zeros((1, 3, 32, 32), np.uint8)
    image[0, :, 0, 0] = 200  # the top-left corner leaves the frame when shifted up or left
    images = np.repeat(image.reshape(1, 3072), 100, axis=0)
    out = data_loader.augment(images, np.random.default_rng(3), flip=False, translate=1)
    kept = out.reshape(-1, 3, 32, 32).any(axis=(1, 2, 3))
    assert 0 < kept.sum() < 100 and set(np.unique(out)) == {0, 200}


# --- the real data ---------------------------------------------------------------------------


@pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"no CIFAR-10 at {REAL_DATA}")
def test_the_real_cifar10():
    train_x, train_y, test_x, test_y = data_loader.load_data(REAL_DATA.parent)
    assert train_x.shape == (50000, 3072) and test_x.shape == (10000, 3072)
    assert train_x.dtype == test_x.dtype == np.uint8
    assert train_y.dtype == test_y.dtype == np.int64
    assert np.bincount(train_y).tolist() == [5000] * 10
    assert np.bincount(test_y).tolist() == [1000] * 10
    for name in cifar10.TRAIN_FILES + [cifar10.TEST_FILE]:
        assert len(cifar10.read_batch(REAL_DATA / name)[1]) == 10000
