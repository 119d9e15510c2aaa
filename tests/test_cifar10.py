"""cifar10.py: safe download and extraction, and safe reading of batch files.

Everything runs on tiny synthetic data and a local HTTP server.
"""
import hashlib
import http.server
import os
import pickle
import socket
import tarfile
import threading

import numpy as np
import pytest

import cifar10
import data_loader
from conftest import batch_bytes, make_archive, make_cifar_dir
from data_loader import DataError

pytestmark = pytest.mark.timeout(60)


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


def test_download_extract_and_load(tmp_path, server, archive, monkeypatch):
    """The default folder, data, is created for the download, as on a fresh clone."""
    body, md5, expected = archive()
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / "data"
    url = server("/cifar.tar.gz", body)
    assert_same(data_loader.load_data("data", url=url, md5=md5, progress=True), expected)
    assert sorted(os.listdir(data_dir)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert_same(data_loader.load_data(data_dir, url=dead_url()), expected)  # no second download


def test_mirror_and_checksum_from_the_environment(tmp_path, server, archive, monkeypatch):
    body, md5, expected = archive()
    monkeypatch.setenv("CIFAR10_URL", server("/mirror.tar.gz", body))
    monkeypatch.setenv("CIFAR10_MD5", md5.upper())
    assert_same(data_loader.load_data(tmp_path, progress=False), expected)


def test_the_official_checksum_is_the_default(tmp_path, server, archive):
    body, _, _ = archive()
    with pytest.raises(DataError, match=f"expected {cifar10.MD5}.*CIFAR10_MD5"):
        data_loader.load_data(tmp_path, url=server("/x.tar.gz", body), progress=False)


def test_a_wrong_checksum_leaves_nothing_behind(tmp_path, server, archive):
    body, md5, _ = archive()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(DataError, match="MD5 .* expected 0{32}.*discarded"):
        data_loader.load_data(data_dir, url=server("/x.tar.gz", body), md5="0" * 32,
                              progress=False)
    assert os.listdir(data_dir) == []


def test_a_dropped_connection_leaves_nothing_and_the_next_run_recovers(tmp_path, server,
                                                                      archive):
    body, md5, expected = archive()
    data_dir, url = tmp_path / "data", server("/x.tar.gz", body, mode="drop")
    data_dir.mkdir()
    with pytest.raises(DataError, match=f"stopped after {len(body) // 2} of {len(body)} bytes"):
        data_loader.load_data(data_dir, url=url, md5=md5, progress=False)
    assert os.listdir(data_dir) == []
    server("/x.tar.gz", body)
    assert_same(data_loader.load_data(data_dir, url=url, md5=md5, progress=False), expected)


def test_a_stalled_server_times_out(tmp_path, server, archive, monkeypatch):
    body, md5, _ = archive()
    monkeypatch.setattr(cifar10, "TIMEOUT", 0.3)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
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
    """Issue 23, item 3: both layouts are named, and an empty folder stays empty."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with pytest.raises(DataError) as info:
        data_loader.load_data(data_dir, url=dead_url(), progress=False)
    message = str(info.value)
    assert f"no CIFAR-10 in {data_dir}" in message and cifar10.URL in message
    assert str(data_dir / "cifar-10-python.tar.gz") in message
    assert str(data_dir / "cifar-10-batches-py") + "/" in message
    assert "\n" not in message
    assert os.listdir(data_dir) == []


def test_a_missing_data_dir_is_named_and_nothing_is_created(tmp_path, server, archive):
    """Issue 23, item 3: a misspelled --data-dir is not created, nor downloaded into."""
    body, md5, _ = archive()
    data_dir = tmp_path / "datta"
    with pytest.raises(DataError, match=f"no CIFAR-10 at {data_dir}: it does not exist "
                                        r"\(looked for the folder .*cifar-10-batches-py/ and "
                                        r"the archive .*cifar-10-python.tar.gz\)"):
        data_loader.load_data(data_dir, url=server("/x.tar.gz", body), md5=md5, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["built.tar.gz", "source"]


def test_a_failed_download_into_the_default_folder_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="no CIFAR-10 in data .*cannot download"):
        data_loader.load_data("data", url=dead_url(), progress=False)
    assert os.listdir(tmp_path) == []


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
    data_dir.mkdir(parents=True)
    with pytest.raises(DataError, match=f"refused .*{message.replace('ABSOLUTE', '')}"):
        data_loader.load_data(data_dir, url=server("/x.tar.gz", body), md5=md5, progress=False)
    assert os.listdir(data_dir) == ["cifar-10-python.tar.gz"]  # no folder, no temporary one
    assert os.listdir(tmp_path / "deep") == ["data"]
    assert not outside.exists() and not (tmp_path / "evil").exists()
