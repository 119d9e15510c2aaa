"""The CIFAR-10 files: fetched, verified and extracted safely, and read without trusting pickle.

    folder = fetch("data")                       # data/cifar-10-batches-py, downloaded if needed
    train_x, train_y, test_x, test_y = read_folder(folder)

Images are uint8 rows of 3072 values in the official order (the red plane, then green,
then blue; each plane 32 rows of 32 pixels); labels are int64 class indices 0-9. Every
limit on what a file may say is checked before it is decompressed, extracted or unpickled.
"""
import codecs
import contextlib
import errno
import hashlib
import math
import os
import pickle
import pickletools
import shutil
import stat
import struct
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib

import numpy as np
from tqdm import tqdm

import cli
import files
import limits


URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILE = "test_batch"
IMAGE_SHAPE = (3, 32, 32)  # channels, rows, columns
PIXELS = 3 * 32 * 32
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck"]
N_CLASSES = len(CLASS_NAMES)

TIMEOUT = 30  # seconds to connect, and to wait for each read of the download
CHUNK = 1 << 20
PART_PREFIX = "." + ARCHIVE + "."  # unfinished downloads: hidden, and never named ARCHIVE
PART_SUFFIX = ".part"
EXTRACT_PREFIX = ".cifar-10-extract-"
STALE_SECONDS = 3600  # leftovers of a killed run older than this are deleted
MEMBERS = TRAIN_FILES + [TEST_FILE, "batches.meta", "readme.html"]  # all that is extracted
DEFAULT_DIR = "data"  # the one data folder created for a download: any other must exist


class DataError(cli.Error):
    """CIFAR-10 cannot be obtained or read: a bad file, a failed download, a refused archive.

    The message is escaped for the terminal: the paths, names and URLs it quotes may not be."""

    def __init__(self, message):
        super().__init__(cli.shown(message))



def fetch(data_dir=DEFAULT_DIR, url=None, md5=None, progress=True):
    """The path of data_dir/cifar-10-batches-py, downloaded and extracted there if needed.

    Uses that folder if present, else data_dir/cifar-10-python.tar.gz, else downloads the
    archive from `url` (default: $CIFAR10_URL, else the official URL). The archive must have
    MD5 `md5` (default: $CIFAR10_MD5, else the official archive's checksum). A `data_dir` that
    does not exist is refused, unless it is the default, which a failed download leaves absent.
    """
    folder = os.path.join(data_dir, FOLDER)
    if _is_folder(folder):
        return folder
    url = url or os.environ.get("CIFAR10_URL") or URL
    md5 = _check_md5_text(md5 or os.environ.get("CIFAR10_MD5") or MD5)
    archive = os.path.join(data_dir, ARCHIVE)
    created = _data_folder(data_dir, folder, archive)
    try:
        _remove_stale(data_dir)
        if os.path.isfile(archive):
            _verify(archive, md5)
        else:
            download(url, archive, md5, progress)
        extract(archive, data_dir)
    except BaseException:
        if created:  # the default folder, made for a download that failed
            with contextlib.suppress(OSError):
                os.rmdir(data_dir)
        raise
    return folder


def _data_folder(data_dir, folder, archive):
    """Make sure `data_dir` is a folder to download into; True if it was created here. Only the
    default is: another that does not exist is more likely a typo than a wish."""
    if os.path.isdir(data_dir):
        return False
    if os.path.normpath(data_dir) != DEFAULT_DIR or os.path.lexists(data_dir):
        what = "is not a folder" if os.path.lexists(data_dir) else "does not exist"
        raise DataError(f"no CIFAR-10 at {data_dir}: it {what} (looked for the folder "
                        f"{folder}/ and the archive {archive}); give the folder that holds "
                        f"either, or create this one to download CIFAR-10 into it")
    try:
        os.mkdir(data_dir)
    except FileExistsError:  # another run made it meanwhile
        return False
    except OSError as exc:
        raise DataError(f"cannot create the data folder {data_dir}: "
                        f"{exc.strerror or exc}") from None
    return True


def _is_folder(folder):
    """Whether `folder` exists (then it must be a readable folder); refuses what would
    otherwise be mistaken for a missing folder and start a download."""
    try:
        info = os.stat(folder)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise DataError(f"cannot open the data folder {folder}: "
                        f"{exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise DataError(f"{folder} is a file, not a folder: move or delete it (the "
                        f"CIFAR-10 batches belong inside a folder of that name)")
    if not os.access(folder, os.R_OK | os.X_OK):
        raise DataError(f"cannot read the data folder {folder}: permission denied")
    return True


def _check_md5_text(md5):
    md5 = md5.strip().lower()
    if len(md5) != 32 or any(c not in "0123456789abcdef" for c in md5):
        raise DataError(f"an MD5 checksum is 32 hex digits, got {md5!r} (argument or CIFAR10_MD5)")
    return md5


def _verify(archive, md5):
    """Refuse an archive found on disk whose checksum is not the expected one."""
    digest = hashlib.md5()
    try:
        with files.open_regular(archive) as f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
    except OSError as exc:
        raise DataError(f"cannot read {archive}: {exc.strerror or exc}") from None
    if digest.hexdigest() != md5:
        raise DataError(f"{archive} has MD5 {digest.hexdigest()}, expected {md5}: it is damaged or "
                        f"another file; delete it to download again, or set CIFAR10_MD5 to its "
                        f"checksum if it is an archive you trust")


def download(url, archive, md5, progress=True):
    """Download `url` to `archive` through a temporary file that becomes `archive` only once
    its MD5 matches: an interrupted or corrupt download leaves nothing behind."""
    fd, part = tempfile.mkstemp(dir=os.path.dirname(archive) or ".", prefix=PART_PREFIX,
                                suffix=PART_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            digest = _fetch(url, f, archive, progress)
            f.flush()
            os.fsync(f.fileno())
        if digest != md5:
            raise DataError(f"the download from {url} has MD5 {digest}, expected {md5}, and was "
                            f"discarded; if {url} serves a different archive you trust, set "
                            f"CIFAR10_MD5 to its checksum")
        os.replace(part, archive)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(part)
        raise


def _fetch(url, f, archive, progress):
    """Stream `url` into file `f`; return the MD5 hex digest of what arrived."""
    digest, received, expected = hashlib.md5(), 0, None
    try:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":  # a FIFO or a device would block or never end
            files.open_regular(urllib.request.url2pathname(parts.path)).close()
        # urlopen verifies TLS certificates with the default SSL context.
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            expected = int(response.headers.get("Content-Length") or 0) or None
            if (expected or 0) > limits.DOWNLOAD_BYTES:
                raise _too_large(url)
            with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                      desc="downloading CIFAR-10", disable=not progress, leave=False) as bar:
                while chunk := response.read(CHUNK):
                    received += len(chunk)
                    if received > limits.DOWNLOAD_BYTES:
                        raise _too_large(url)
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as exc:  # URLError, HTTPError and timeouts are OSErrors
        reason = exc if isinstance(exc, urllib.error.HTTPError) else getattr(exc, "reason", exc)
        folder = os.path.join(os.path.dirname(archive), FOLDER)
        raise DataError(f"no CIFAR-10 in {os.path.dirname(archive) or '.'} (looked for the "
                        f"extracted folder {folder}/ and the archive {archive}) and cannot "
                        f"download it from {url} ({reason}); put either there (the archive "
                        f"is {URL}), or set CIFAR10_URL to a mirror") from None
    if expected is not None and received != expected:
        raise DataError(f"the download from {url} stopped after {received} of {expected} bytes "
                        f"and was discarded; run again to retry")
    return digest.hexdigest()


def _too_large(url):
    return DataError(f"the download from {url} is larger than {limits.DOWNLOAD_BYTES} "
                     f"bytes (twice the CIFAR-10 archive) and was stopped and discarded: it is "
                     f"not the CIFAR-10 python archive")


def extract(archive, data_dir):
    """Extract the CIFAR-10 files of `archive`'s cifar-10-batches-py folder into `data_dir`,
    each at most limits.ARCHIVE_MEMBER_BYTES, refusing members that could land outside it
    and skipping any other; the folder appears only once complete."""
    target = os.path.join(data_dir, FOLDER)
    tmp = tempfile.mkdtemp(dir=data_dir, prefix=EXTRACT_PREFIX)
    extracted = os.path.join(tmp, FOLDER)
    os.mkdir(extracted)
    try:
        with files.open_regular(archive) as f, \
                tarfile.open(archive, "r:gz", f, tarinfo=_BoundedTarInfo) as tar:
            for count, member in enumerate(tar, 1):  # one pass: check each before it is written
                if count > limits.ARCHIVE_MEMBERS:
                    raise DataError(f"refused {archive}: more than {limits.ARCHIVE_MEMBERS} "
                                    f"members, and CIFAR-10 has 9")
                _check_member(member, tmp, archive)
                if member.size > limits.ARCHIVE_MEMBER_BYTES:  # refused before it is read
                    raise DataError(f"refused {archive}: member {member.name!r} has "
                                    f"{member.size} bytes, more than the "
                                    f"{limits.ARCHIVE_MEMBER_BYTES} a CIFAR-10 file may have")
                folder, _, name = member.name.rstrip("/").partition("/")
                if member.isfile() and folder == FOLDER and name in MEMBERS:
                    _copy_member(tar, member, os.path.join(extracted, name), archive)
        for name in TRAIN_FILES + [TEST_FILE]:
            if not os.path.isfile(os.path.join(extracted, name)):
                raise DataError(f"{archive} holds no {FOLDER}/{name}: it is not the "
                                f"CIFAR-10 python archive; delete it to download again")
        try:
            os.rename(extracted, target)
        except OSError:
            if not os.path.isdir(target):  # else a concurrent run put it there first
                raise
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise DataError(f"cannot extract {archive} ({exc}); delete it to "
                        f"download again") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class _BoundedTarInfo(tarfile.TarInfo):
    """A tar header whose extended headers (long names, pax records), which tarfile reads whole
    into memory, may be at most limits.TAR_HEADER_BYTES; sparse files are refused."""

    def _proc_member(self, tarfile_):
        extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                    tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
        if self.type == tarfile.GNUTYPE_SPARSE or (self.type in extended
                                                   and self.size > limits.TAR_HEADER_BYTES):
            raise DataError(f"refused {tarfile_.name}: a sparse member or an "
                            f"extended header of {self.size} bytes, which CIFAR-10 does not have")
        return super()._proc_member(tarfile_)


def _copy_member(tar, member, path, archive):
    """Write one archive member to the new file `path`, counting bytes instead of trusting
    the member's header: more than limits.ARCHIVE_MEMBER_BYTES refuses the archive."""
    refused = DataError(f"refused {archive}: member {member.name!r} is larger than "
                        f"the {limits.ARCHIVE_MEMBER_BYTES} bytes a CIFAR-10 file may have")
    written = 0
    with tar.extractfile(member) as source, open(path, "xb") as out:  # "x": a duplicate fails
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > limits.ARCHIVE_MEMBER_BYTES:
                raise refused
            out.write(chunk)


def _check_member(member, root, archive):
    """Admit only regular files and folders whose path stays inside `root`."""
    name = member.name
    root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(root, name))
    if (os.path.isabs(name) or ".." in name.replace("\\", "/").split("/")
            or os.path.commonpath([root, path]) != root):
        raise DataError(f"refused {archive}: member {name!r} would land outside the target folder")
    if not (member.isfile() or member.isdir()):
        kind = "link" if member.issym() or member.islnk() else "special file"
        raise DataError(f"refused {archive}: member {name!r} is a {kind}, and CIFAR-10 holds "
                        f"only regular files")


def _remove_stale(data_dir):
    """Delete partial downloads and extractions left by a killed run (they are never read)."""
    now = time.time()
    try:
        entries = list(os.scandir(data_dir))
    except OSError as exc:
        raise DataError(f"cannot read the data folder {data_dir}: "
                        f"{exc.strerror or exc}") from None
    for entry in entries:
        partial = entry.name.startswith(PART_PREFIX) and entry.name.endswith(PART_SUFFIX)
        if not (partial or entry.name.startswith(EXTRACT_PREFIX)):
            continue
        with contextlib.suppress(OSError):
            if now - entry.stat(follow_symlinks=False).st_mtime > STALE_SECONDS:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.remove(entry.path)


# --- reading the batch files -----------------------------------------------------------------


# A batch pickle may name only these globals, and each resolves to an inert stand-in below:
# nothing NumPy would build from a crafted state (object or void dtypes, odd strides, a
# shape larger than its buffer) is ever created. Only plain integer dtypes are known.
_DTYPE_NAMES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8"}
_BYTE_ORDERS = {"|", "<", ">", "="}


def _text(value):
    """A short str from a str, or from the bytes Python 2's str loads as; None otherwise (a
    long one is not decoded: it may be one object referenced a million times)."""
    if isinstance(value, (str, bytes)) and len(value) <= 16:
        return value.decode("latin1") if isinstance(value, bytes) else value
    return None


def _brief(value):
    """`value` for an error message: its repr if it is a short string or a number, else its
    type (a crafted value may be huge, or a graph whose repr is)."""
    if isinstance(value, (str, bytes)) and len(value) <= 40 or (
            type(value) in (int, float) and abs(value) < 1e18):
        return repr(value)
    return f"a {type(value).__name__}"


class _DType:
    """What `numpy.dtype(name, align, copy)` rebuilds to: a plain integer dtype, or a refusal.

    Its __setstate__ accepts only the plain state NumPy writes for such a dtype (no fields,
    no subarray, no flags), so no crafted state reaches NumPy's dtype.__setstate__."""

    def __init__(self, name, align=False, copy=True):
        if _text(name) not in _DTYPE_NAMES:
            raise pickle.UnpicklingError(f"dtype {_brief(name)} refused: a batch holds uint8 "
                                         f"images and integer labels")
        self.dtype = np.dtype(_text(name))

    def __setstate__(self, state):
        """(version 3 or 4, byte order, None, None, None, -1, -1, 0[, None]), as NumPy writes."""
        if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)
                and _text(state[1]) in _BYTE_ORDERS and state[2:5] == (None, None, None)
                and state[5] in (-1, self.dtype.itemsize)
                and state[6] in (-1, self.dtype.alignment) and state[7:] in ((0,), (0, None))):
            raise pickle.UnpicklingError("a dtype with a state other than NumPy's for a plain "
                                         "integer type")
        if _text(state[1]) in "<>":
            self.dtype = self.dtype.newbyteorder(_text(state[1]))


_NDARRAY = object()  # what `numpy.ndarray` resolves to: a token, callable by nobody


class _Array:
    """What `_reconstruct(ndarray, (0,), b'b')` followed by BUILD rebuilds to: an `_array`."""

    array = None  # until BUILD gives the state

    def __init__(self, subtype, shape, typecode):
        if subtype is not _NDARRAY:
            raise pickle.UnpicklingError("_reconstruct of something other than an ndarray")

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]  # the version number, 1
        if not (isinstance(state, tuple) and len(state) == 4):
            raise pickle.UnpicklingError("an ndarray state that is not (shape, dtype, order, data)")
        shape, dtype, fortran, data = state
        self.array = _array(data, dtype, shape, "F" if fortran not in (False, 0) else "C")


def _array(data, dtype, shape, order="C"):
    """What `numpy.core.numeric._frombuffer(data, dtype, shape, order)` (protocol 5) rebuilds
    to: a C-ordered plain integer array of at most IMAGES_PER_BATCH x PIXELS elements, a
    read-only view of a buffer of exactly its size (any number of them over one buffer cost
    nothing more)."""
    if not (isinstance(shape, tuple) and 1 <= len(shape) <= 2
            and all(type(n) is int and n >= 0 for n in shape)
            and math.prod(shape) <= limits.IMAGES_PER_BATCH * PIXELS):
        raise pickle.UnpicklingError(f"an array of shape {_brief(shape)}")
    if not isinstance(dtype, _DType) or order != "C":
        raise pickle.UnpicklingError("an array that is not a C-ordered plain integer array")
    if not (isinstance(data, (bytes, bytearray))
            and len(data) == math.prod(shape) * dtype.dtype.itemsize):
        raise pickle.UnpicklingError("an array whose data does not match its shape")
    return np.frombuffer(data, dtype.dtype).reshape(shape)


def _scalar(dtype, data):
    """What `numpy.core.multiarray.scalar(dtype, bytes)` rebuilds to: a plain Python int."""
    if not (isinstance(dtype, _DType) and isinstance(data, bytes)
            and len(data) == dtype.dtype.itemsize):
        raise pickle.UnpicklingError("a NumPy scalar that is not a plain integer")
    return int(np.frombuffer(data, dtype.dtype)[0])


# Everything a CIFAR-10 batch may name (the official files name numpy.core, NumPy 2 writes
# numpy._core, and protocol 5 _frombuffer; labels may be NumPy ints in re-saved files); dicts,
# lists, str, bytes and ints need no global. `_codecs.encode`, which pickles of protocol < 3
# call to rebuild bytes, is the unpickler's own method: what it builds is counted.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy.core.numeric", "_frombuffer"): _array,
    ("numpy._core.numeric", "_frombuffer"): _array,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
    ("_codecs", "encode"): "encode",
}

# The opcodes by their byte, the width of each kind of length prefix, and the opcodes whose
# argument becomes a str, with the codec that decodes it.
_OPCODES = {op.code.encode("latin1")[0]: op for op in pickletools.opcodes}
_COUNTS = {pickletools.TAKEN_FROM_ARGUMENT1: "<B", pickletools.TAKEN_FROM_ARGUMENT4: "<i",
           pickletools.TAKEN_FROM_ARGUMENT4U: "<I", pickletools.TAKEN_FROM_ARGUMENT8U: "<Q"}
_TEXTS = {"UNICODE": "raw-unicode-escape", "SHORT_BINUNICODE": "utf-8", "BINUNICODE": "utf-8",
          "BINUNICODE8": "utf-8", "GLOBAL": "utf-8", "INST": "utf-8"}


# The entries of dicts and sets each opcode makes, from the items it takes off the stack.
_ENTRIES = {"SETITEM": lambda items: 1, "SETITEMS": lambda items: items // 2,
            "DICT": lambda items: items // 2, "ADDITEMS": lambda items: items,
            "FROZENSET": lambda items: items}


class _Stack:
    """The depth of the unpickler's stack and its marks, followed opcode by opcode, to know
    how many items an opcode takes down to its mark. A pop past a mark is refused, as the
    unpickler refuses it."""

    def __init__(self):
        self.depth, self.marks = 0, []

    def apply(self, op):
        """Follow `op`; return how many items it took down to a mark (0 for others)."""
        before, after, items = op.stack_before, op.stack_after, 0
        if op.name == "POP" and self.marks and self.marks[-1] == self.depth:
            self.marks.pop()  # POP takes a mark that is on top
            return 0
        if pickletools.markobject in before:
            if not self.marks:
                raise pickle.UnpicklingError(f"{op.name} without a MARK")
            items, self.depth = self.depth - self.marks[-1], self.marks.pop()
            before = before[:before.index(pickletools.markobject)]
        self.depth -= len(before)
        if self.depth < (self.marks[-1] if self.marks else 0):
            raise pickle.UnpicklingError(f"{op.name} takes more than the stack holds")
        if pickletools.markobject in after:
            self.marks.append(self.depth)
        else:
            self.depth += len(after)
        return items


def _opcodes(raw):
    """Each opcode of the pickle `raw` up to its STOP, as (opcode, its argument's bytes),
    read the way the unpickler reads them but building nothing."""
    view, pos = memoryview(raw), 0
    while True:
        op = _OPCODES.get(raw[pos]) if pos < len(raw) else None
        if op is None:
            raise pickle.UnpicklingError(f"no opcode at byte {pos}")
        n = op.arg.n if op.arg else 0
        start = end = pos + 1
        if n == pickletools.UP_TO_NEWLINE:  # GLOBAL and INST take two lines
            for _ in range(2 if op.arg.name == "stringnl_noescape_pair" else 1):
                end = raw.find(b"\n", end) + 1 or len(raw) + 1
        elif n < 0:
            count = struct.unpack_from(_COUNTS[n], raw, start)[0]
            start += struct.calcsize(_COUNTS[n])
            end = start + count if count >= 0 else len(raw) + 1
        else:
            end = start + n
        if end > len(raw):
            raise pickle.UnpicklingError(f"{op.name} at byte {pos} runs past the end")
        yield op, view[start:end]
        if op.name == "STOP":
            return
        pos = end


def _text_width(data, encoding):
    """The characters of the str that `data` decodes to, and the bytes each takes (ASCII with
    one emoji in it takes four), found a megabyte at a time."""
    decoder = codecs.getincrementaldecoder(encoding)(
        "surrogatepass" if encoding == "utf-8" else "strict")
    chars = widest = 0
    for start in range(0, len(data), CHUNK):
        piece = decoder.decode(data[start:start + CHUNK], start + CHUNK >= len(data))
        chars, widest = chars + len(piece), max(widest, ord(max(piece, default="\0")))
    return chars, 1 if widest < 0x100 else 2 if widest < 0x10000 else 4


class _Input:
    """The pickle's bytes as a file whose reads are views, not copies, for the unpickler."""

    def __init__(self, raw):
        self.raw, self.view, self.pos = raw, memoryview(raw), 0

    def read(self, n=-1):
        end = len(self.raw) if n is None or n < 0 else min(self.pos + n, len(self.raw))
        piece, self.pos = self.view[self.pos:end], end
        return piece

    def readline(self):
        return self.read((self.raw.find(b"\n", self.pos) + 1 or len(self.raw) + 1) - self.pos)

    def readinto(self, buffer):
        piece = self.read(len(buffer))
        buffer[:len(piece)] = piece
        return len(piece)


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain integer arrays and containers, within one memory
    budget (limits.UNPICKLED_BYTES): loading a crafted file can neither run code, hand NumPy a
    state that corrupts memory, nor take more memory than a real batch.

    Before anything is built, every opcode is charged what it builds (its argument, a memo
    slot up to its index, or the largest object an opcode makes), and a text may take no more
    than the file's size while it is decoded; while loading, each `_codecs.encode` is charged
    the bytes it makes (one text may be encoded many times). So a batch takes at most twice
    its size plus the budget."""

    def __init__(self, raw, path):
        super().__init__(_Input(raw), encoding="bytes")
        self.path, self.spent, memo, entries, stack = path, 0, 0, 0, _Stack()
        for op, arg in _opcodes(raw):
            cost = len(arg)
            if op.name in _TEXTS:  # CPython's decoder holds len(arg) characters of that width
                chars, width = _text_width(arg, _TEXTS[op.name])
                if len(arg) * width > len(raw):
                    raise pickle.UnpicklingError("a text whose decoding would take more than "
                                                 "the file's size")
                cost = chars * width
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT"):  # the memo grows to twice the index
                index = (int(bytes(arg)) if op.name == "PUT" else
                         int.from_bytes(arg, "little"))
                cost, memo = cost + 16 * max(0, index + 1 - memo), max(memo, index + 1)
            entries += _ENTRIES.get(op.name, lambda items: 0)(stack.apply(op))
            if entries > limits.DICT_ENTRIES:  # keys crafted to share a hash: quadratic time
                raise pickle.UnpicklingError(f"more than the {limits.DICT_ENTRIES} dict and "
                                             f"set entries a batch may hold")
            self.charge(limits.OPCODE_BYTES + cost)

    def charge(self, size):
        self.spent += size
        if self.spent > limits.UNPICKLED_BYTES:
            raise pickle.UnpicklingError(f"it would build more than the "
                                         f"{limits.UNPICKLED_BYTES} bytes a batch may take")

    def encode(self, text, encoding="latin1"):
        """What `_codecs.encode(text, "latin1")` rebuilds: the bytes a pickle of protocol < 3
        stores as text."""
        if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
            raise pickle.UnpicklingError(f"_codecs.encode with {_brief(encoding)}")
        self.charge(len(text))
        return text.encode("latin1")

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise DataError(f"{self.path} is not a CIFAR-10 batch: it names "
                            f"{module[:100]}.{name[:100]}, which was refused (a batch "
                            f"holds only NumPy arrays and lists)")
        found = _ALLOWED[module, name]
        return getattr(self, found) if isinstance(found, str) else found


def read_batch(path):
    """The images (uint8, (N, 3072), N <= 10000) and labels (int64, (N,)) of one batch file,
    checked; the file must be a regular file of at most limits.BATCH_FILE_BYTES."""
    most = limits.BATCH_FILE_BYTES
    try:
        with files.open_regular(path, most) as f:
            raw = f.read(most + 1)  # the file may grow after the size check
        if len(raw) > most:
            raise OSError(errno.EFBIG, f"more than the {most} bytes it may hold")
        batch = _BatchUnpickler(raw, path).load()
    except DataError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}; put the CIFAR-10 "
                        f"python batches there or delete its folder to download them "
                        f"again") from None
    except Exception as exc:  # any parse failure or refusal means a damaged or crafted file
        raise DataError(f"{path} is damaged or not a CIFAR-10 batch "
                        f"({type(exc).__name__}: {str(exc)[:200]}); delete its folder to "
                        f"download again") from None
    if not isinstance(batch, dict):
        raise DataError(f"{path} is not a CIFAR-10 batch: it holds a "
                        f"{type(batch).__name__}")
    data, labels = (batch.get(key, batch.get(key.encode())) for key in ("data", "labels"))
    data, labels = (value.array if isinstance(value, _Array) else value
                    for value in (data, labels))
    return _check_batch(path, data, labels)


def _check_batch(path, data, labels):
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == PIXELS and len(data)):
        described = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                     else type(data).__name__)
        raise DataError(f"{path}: 'data' should be a uint8 array of shape (N, {PIXELS}), "
                        f"got {described}")
    found = _labels(labels, len(data))
    if found is None:
        described = (f"{labels.dtype} values of shape {labels.shape}"
                     if isinstance(labels, np.ndarray) else f"a {type(labels).__name__}"
                     + (f" of {len(labels)} items" if isinstance(labels, list) else ""))
        raise DataError(f"{path}: 'labels' should be {len(data)} integers, got {described}")
    if found.min() < 0 or found.max() >= N_CLASSES:
        raise DataError(f"{path}: labels must lie in 0-{N_CLASSES - 1}, found "
                        f"{found.min()} to {found.max()}")
    return data, found


def _labels(labels, n):
    """`labels` as n int64 values, or None: a list is checked item by item before NumPy sees
    it (K references to one list of K would make K² values)."""
    if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.shape == (n,):
        return labels.astype(np.int64)  # uint64 past int64 wraps to negative: refused
    if isinstance(labels, list) and len(labels) == n and all(type(y) is int for y in labels):
        with contextlib.suppress(OverflowError):
            return np.array(labels, np.int64)
    return None


def read_folder(folder):
    """The four arrays of a cifar-10-batches-py folder (see `load_data`)."""
    return (*_read_batches(folder, TRAIN_FILES), *_read_batches(folder, [TEST_FILE]))


def _read_batches(folder, names):
    """Concatenate batch files into one preallocated array, one batch in memory at a time."""
    images = labels = None
    for i, name in enumerate(names):
        path = os.path.join(folder, name)
        data, y = read_batch(path)
        if images is None:
            n, first = len(y), path
            images = np.empty((n * len(names), PIXELS), np.uint8)
            labels = np.empty(n * len(names), np.int64)
        elif len(y) != n:
            raise DataError(f"{path} holds {len(y)} images but {first} holds {n}: the batch "
                            f"files of {folder} do not belong together")
        images[i * n:(i + 1) * n] = data
        labels[i * n:(i + 1) * n] = y
        del data  # frees the batch (and the pickle's buffer) before the next one is read
    return images, labels
