"""Reading the run folder's files as edgepatch writes them (docs/artifacts.md).

Every HDF5 file is sealed: a 512-byte user block holding the CRC-32 and length of every byte after it,
written last. A file is read whole, its seal checked, and only then given to h5py (from memory, so a
file renamed over while we read cannot mix two versions). Each numeric dataset's ``crc32`` attribute is
checked as it is read, as the C readers do. Anything wrong raises ResultsError with one line naming the
file and the dataset or field.
"""

import io
import json
import os
import zlib

import h5py
import numpy as np

SEAL_BYTES = 512
SEAL_MAGIC = b"edgepatch h5store seal 1\n"

# Token types and donor kinds as the C code numbers them (stages/prompts.c); used only when a file
# carries neither an enum_names attribute nor the root type_names / donor_kind_names attributes.
TYPE_NAMES = ("bos", "x", "t", "y", "n", "query", "last", "target")
DONOR_KIND_NAMES = ("random_xy", "random_y", "random_x", "other_pairs", "shuffle_y", "other_task_x", "other_task_y",
                    "other_mapping", "other_mapping_x", "mean")


class ResultsError(ValueError):
    """A run file that is missing, unfinished, damaged or not as docs/artifacts.md describes it.

    The message is one line naming the file and the dataset or field."""


class MissingResult(ResultsError, FileNotFoundError):
    """The file a table comes from is not there (the stage has not run yet)."""


def _text(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value[()])
    return value


class SealedH5:
    """One sealed edgepatch HDF5 file, opened read-only from memory."""

    def __init__(self, path, expect_format=None, verify=True):
        self.path = str(path)
        if not os.path.exists(self.path):
            raise MissingResult(f"{self.path}: no such file")
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ResultsError(f"{self.path}: cannot read: {e.strerror}") from None
        if verify:
            check_seal(self.path, data)
        try:
            self.h5 = h5py.File(io.BytesIO(data), "r")
        except OSError as e:
            raise ResultsError(f"{self.path}: not an HDF5 file ({e})") from None
        self.verify = verify
        if self.attr("edgepatch_complete", None) != 1:
            raise ResultsError(f"{self.path}: attribute edgepatch_complete: missing (an unfinished write)")
        fmt = self.attr("format", "")
        if expect_format and not (isinstance(fmt, str) and fmt.startswith(expect_format + "-")):
            raise ResultsError(f"{self.path}: attribute format: {fmt!r}, expected {expect_format}-N")

    def close(self):
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def has(self, name):
        return name in self.h5

    def attr(self, name, default=KeyError, obj="/"):
        attrs = self.h5[obj].attrs
        if name not in attrs:
            if default is KeyError:
                where = "" if obj == "/" else f"{obj.strip('/')}/"
                raise ResultsError(f"{self.path}: attribute {where}{name}: missing")
            return default
        value = attrs[name]
        if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "OSU":
            return [_text(v) for v in value]
        value = _text(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return float(value)
        return value

    def read(self, name, rank=None, rows=None):
        """A dataset as a numpy array, its checksum verified; rank and rows (first dimension) checked."""
        if name not in self.h5 or not isinstance(self.h5[name], h5py.Dataset):
            raise ResultsError(f"{self.path}: dataset {name}: missing")
        ds = self.h5[name]
        if ds.dtype.kind in "OSU" or h5py.check_string_dtype(ds.dtype) is not None:
            a = ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) is not None else ds[()]
            a = np.asarray(a, dtype=object)
        else:
            a = ds[()]
            crc = ds.attrs.get("crc32")
            if self.verify and crc is not None:
                stored = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
                if zlib.crc32(stored.tobytes()) != int(crc):
                    raise ResultsError(f"{self.path}: dataset {name}: checksum mismatch (damaged)")
        if rank is not None and a.ndim != rank:
            raise ResultsError(f"{self.path}: dataset {name}: rank {a.ndim}, expected {rank}")
        if rows is not None and a.shape[0] != rows:
            raise ResultsError(f"{self.path}: dataset {name}: {a.shape[0]} rows, expected {rows} (made from other prompts?)")
        return a

    def enum_names(self, name, fallback):
        """The names of an enum-valued dataset: its enum_names attribute (index = value) when present."""
        if name in self.h5 and "enum_names" in self.h5[name].attrs:
            names = self.attr("enum_names", obj=name)
            if isinstance(names, str):  # a comma-separated string, should a writer choose that form
                names = names.split(",")
            return [str(n) for n in names]
        return list(fallback)

    def string_dataset(self, names, shape):
        """The first string dataset among names (then any string dataset) with the given shape, or None."""
        candidates = [n for n in names if n in self.h5]
        candidates += [n for n, o in self.h5.items() if isinstance(o, h5py.Dataset) and n not in candidates]
        for n in candidates:
            ds = self.h5[n]
            if isinstance(ds, h5py.Dataset) and ds.shape == tuple(shape) and h5py.check_string_dtype(ds.dtype) is not None:
                return self.read(n)
        return None


def check_seal(path, data):
    head = data[:SEAL_BYTES]
    if len(data) < SEAL_BYTES or not head.startswith(SEAL_MAGIC):
        raise ResultsError(f"{path}: no edgepatch seal (an unfinished write, or written before seals existed: rerun edgepatch run)")
    fields = dict(line.split(b" ", 1) for line in head.rstrip(b"\0").split(b"\n")[1:] if b" " in line)
    try:
        crc, size = int(fields[b"crc32"], 16), int(fields[b"bytes"])
    except (KeyError, ValueError):
        raise ResultsError(f"{path}: seal: unreadable") from None
    body = memoryview(data)[SEAL_BYTES:]
    if len(body) != size or zlib.crc32(body) != crc:
        raise ResultsError(f"{path}: seal: the bytes do not match it (damaged or truncated)")


def load_json(path, expect=dict):
    path = str(path)
    if not os.path.exists(path):
        raise MissingResult(f"{path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ResultsError(f"{path}: not JSON ({e})") from None
    if expect is not None and not isinstance(value, expect):
        raise ResultsError(f"{path}: expected a JSON {'object' if expect is dict else expect.__name__}")
    return value


def field(path, obj, key, kind, where=""):
    """obj[key], checked to be of kind (a type or tuple of types); one line naming the field otherwise."""
    if not isinstance(obj, dict) or key not in obj:
        raise ResultsError(f"{path}: field {where}{key}: missing")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))):
        raise ResultsError(f"{path}: field {where}{key}: wrong type")
    return value
