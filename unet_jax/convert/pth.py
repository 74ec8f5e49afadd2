"""Read PyTorch checkpoint files (``torch.save``) into numpy arrays, without PyTorch.

Official weights (Segment Anything's ``sam_vit_b_01ec64.pth``, torchvision's
``resnet34-b627a593.pth``, ...) are PyTorch state dicts; the ports in this package convert
them to Flax parameters. PyTorch is not a dependency, so :func:`read_torch_checkpoint`
parses the file format itself.

The format (``torch.save`` since PyTorch 1.6, "zip serialization") is an uncompressed zip
archive whose entries all lie under one folder ``<archive>/`` (the file's stem, or
``archive``):

* ``<archive>/data.pkl``: a pickle (protocol 2) of the saved object. Tensors appear as
  calls ``torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride,
  requires_grad, backward_hooks[, metadata])`` (``_rebuild_tensor_v3(..., dtype)`` for
  dtypes without a legacy storage class, e.g. ``torch.uint16``), parameters as
  ``torch._utils._rebuild_parameter(tensor, requires_grad, backward_hooks)``, and every
  storage as a *persistent id* ``('storage', storage_type, key, location, numel)`` where
  ``storage_type`` is a class such as ``torch.FloatStorage`` (``numel`` in elements) or
  ``torch.storage.UntypedStorage`` (``numel`` in bytes);
* ``<archive>/data/<key>``: the raw bytes of storage ``key``;
* ``<archive>/byteorder`` (``little`` or ``big``; absent in old files, meaning little),
  ``<archive>/version`` and bookkeeping entries, which are ignored.

Safety: unpickling can run arbitrary code, so the unpickler here resolves *only* the names
a state dict needs (the rebuild functions above, ``collections.OrderedDict``, the storage
classes and ``torch`` dtype objects), each to a local stand-in; PyTorch itself is never
imported. Any other global in the pickle (an ``argparse.Namespace``, a ``datetime``, a
numpy scalar, a user class, ``os.system``) is refused before anything is called.

Memory: each storage record is read from the archive once, into one buffer, however many
tensors view it (a tensor and its transpose, slices of one buffer); each tensor is then
copied out of its storage into its own contiguous array, and the storage buffers are
released when the call returns. Peak memory is therefore about twice the checkpoint's
size.

Failure modes, all :class:`TorchCheckpointError` (a ``ValueError``) whose message names the
file and says what was expected: a missing or unreadable file; a file that is not a zip
archive (a text file, a Git LFS pointer, random bytes, or the legacy pre-1.6 format, for
which the message says how to re-save it); a truncated or corrupt archive (a bad zip
directory, a CRC mismatch, or a storage record shorter than ``numel * itemsize``, so a
short array is never returned); no ``<archive>/data.pkl``; a disallowed class in the
pickle; a storage dtype with no numpy equivalent (``float8``, quantized types); a tensor
whose size/stride reach outside its storage; and, when selecting the state dict, a
non-tensor leaf where a tensor is expected or a wrapper whose state dict cannot be found.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TorchCheckpointError", "read_torch_checkpoint"]

# torch.save's legacy (pre-1.6) format begins with a pickled magic number.
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ZIP_EXPECTED = "expected a zip archive written by torch.save (PyTorch >= 1.6)"
_RESAVE_HINT = "re-save it with torch.save(..., _use_new_zipfile_serialization=True) on a machine with PyTorch"
# Keys under which training scripts commonly wrap the state dict.
_WRAPPER_KEYS = ("state_dict", "model", "params")


class TorchCheckpointError(ValueError):
    """A file that is not (or not entirely) a readable PyTorch state-dict checkpoint."""


@dataclass(frozen=True)
class _DType:
    """A torch element type: its name and the numpy dtype of the arrays read (``None``: no
    numpy equivalent). ``bfloat16`` is stored as ``uint16`` bits and read as float32."""

    name: str
    np_dtype: np.dtype | None

    @property
    def storage_dtype(self) -> np.dtype | None:
        """The numpy dtype of one stored element (``uint16`` for bfloat16)."""
        return np.dtype(np.uint16) if self.name == "bfloat16" else self.np_dtype


def _dt(name: str, np_name: str | None) -> _DType:
    return _DType(name, None if np_name is None else np.dtype(np_name))


_DTYPES: dict[str, _DType] = {
    d.name: d
    for d in (
        _dt("float32", "float32"),
        _dt("float64", "float64"),
        _dt("float16", "float16"),
        _dt("bfloat16", "float32"),
        _dt("int64", "int64"),
        _dt("int32", "int32"),
        _dt("int16", "int16"),
        _dt("int8", "int8"),
        _dt("uint8", "uint8"),
        _dt("uint16", "uint16"),
        _dt("uint32", "uint32"),
        _dt("uint64", "uint64"),
        _dt("bool", "bool"),
        _dt("complex64", "complex64"),
        _dt("complex128", "complex128"),
    )
}
# torch dtype aliases (torch.float is torch.float32, ...): pickled by their canonical name,
# accepted under either.
for _alias, _name in {
    "float": "float32",
    "double": "float64",
    "half": "float16",
    "long": "int64",
    "int": "int32",
    "short": "int16",
    "cfloat": "complex64",
    "cdouble": "complex128",
}.items():
    _DTYPES[_alias] = _DTYPES[_name]
# torch dtypes numpy cannot represent: resolvable (so the error names the dtype) but refused
# when a tensor uses them.
for _name in (
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "complex32",
    "chalf",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    *(f"uint{i}" for i in range(1, 8)),
    *(f"int{i}" for i in range(1, 8)),
):
    _DTYPES.setdefault(_name, _DType(_name, None))

# Legacy typed storage classes (what torch.save still pickles for the classic dtypes).
_STORAGE_CLASSES: dict[str, str] = {
    "FloatStorage": "float32",
    "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16",
    "DoubleStorage": "float64",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
}


@dataclass(frozen=True)
class _StorageType:
    """A storage class from the pickle. ``dtype`` is None for untyped (byte) storages;
    ``known`` is False for a ``torch.*Storage`` this reader has no numpy dtype for."""

    name: str
    dtype: _DType | None
    known: bool = True


_UNTYPED = _StorageType("UntypedStorage", None)


@dataclass(frozen=True)
class _Storage:
    """One storage record: its raw (native, contiguous) bytes and element type."""

    key: str
    raw: np.ndarray  # uint8, exactly numel * itemsize bytes
    dtype: _DType | None  # None: untyped bytes (the tensor's dtype says how to read them)


def _name_of(path: str | os.PathLike) -> str:
    return os.fspath(path)


def read_torch_checkpoint(path: str | os.PathLike, *, key: str | None = None) -> dict[str, np.ndarray]:
    """The state dict in PyTorch checkpoint ``path``, as ``{name: numpy array}``.

    ``path`` is a file written by ``torch.save`` in the zip format (PyTorch >= 1.6; see the
    module docstring for the layout). Tensors come back as contiguous, writeable, native
    byte order numpy arrays of their shape (0-d and empty tensors included) and dtype:
    float32/float64/float16 (float16 is kept), int8..int64, uint8..uint64, bool,
    complex64/128; **bfloat16 becomes float32**, exactly (each value's 16 bits are the
    upper half of the float32). Parameters and buffers alike (``num_batches_tracked`` is an
    int64 0-d array). Views sharing one storage are read from it once.

    Which object is the state dict:

    * ``key`` given: ``checkpoint[key]`` (a dotted ``key`` such as ``"ema.model"`` walks
      nested dicts when there is no such top-level key);
    * ``key=None``: the top-level dict if all its values are tensors; otherwise the one of
      ``"state_dict"``, ``"model"``, ``"params"`` that is a dict of tensors, if exactly one
      is (``{"model": sd, "epoch": 3}``); otherwise the top-level dict if it is a nested
      dict of tensors (``{"encoder": {"w": ...}}`` gives ``{"encoder.w": ...}``).

    Nested dicts of tensors are flattened, their keys joined with ``"."``.

    Raises :class:`TorchCheckpointError` (see the module docstring for every case): a
    missing file, a file that is not a torch zip archive (the legacy pre-1.6 format
    included), a truncated or corrupt archive or storage record, no ``data.pkl``, a class
    in the pickle other than those a state dict needs (nothing else is ever called), a
    dtype numpy cannot represent, an unknown ``key``, a non-tensor leaf in the selected
    dict, or a wrapper with no identifiable state dict (the message lists the top-level
    keys).
    """
    name = _name_of(path)
    obj = _load(name)
    return _select_state_dict(obj, name, key)


# ---------------------------------------------------------------------------- archive


def _load(name: str) -> Any:
    """The unpickled top-level object of checkpoint ``name`` (tensors as numpy arrays)."""
    try:
        with open(name, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise TorchCheckpointError(
            f"{name}: no such file; expected a PyTorch checkpoint written by torch.save"
        ) from None
    except OSError as e:
        raise TorchCheckpointError(
            f"{name}: cannot read the file ({e.strerror or e}); expected a PyTorch checkpoint written by torch.save"
        ) from None
    if not head.startswith(b"PK"):
        if head.startswith(b"\x80") and _is_legacy(name):
            return _load_legacy(name)
        _raise_not_zip(name, head)
    try:
        zf = zipfile.ZipFile(name)
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise TorchCheckpointError(
            f"{name}: truncated or corrupt zip archive ({e}); {_ZIP_EXPECTED}, complete"
        ) from None
    with zf:
        return _unpickle_archive(zf, name)


def _raise_not_zip(name: str, head: bytes) -> None:
    if not head:
        what = "the file is empty"
    elif _is_legacy(name):
        raise TorchCheckpointError(
            f"{name}: legacy (pre-1.6) PyTorch serialization format, not the zip format; "
            f"{_ZIP_EXPECTED}: {_RESAVE_HINT}"
        )
    elif head.startswith(b"version https://git-lfs"):
        what = "it is a Git LFS pointer (fetch the real file with `git lfs pull`)"
    else:
        what = f"it starts with {head[:16]!r}"
    raise TorchCheckpointError(f"{name}: not a PyTorch zip checkpoint ({what}); {_ZIP_EXPECTED}")


def _is_legacy(name: str) -> bool:
    """Whether ``name`` is torch.save's legacy format: a pickled magic number first (any
    protocol), or the even older tar layout."""
    try:
        with open(name, "rb") as f:
            if f.read(1) == b"\x80":
                f.seek(0)
                return _NothingUnpickler(f).load() == _LEGACY_MAGIC
    except Exception:  # noqa: BLE001 - anything unreadable is simply not the legacy format
        return False
    try:
        return tarfile.is_tarfile(name)
    except OSError:
        return False


class _NothingUnpickler(pickle.Unpickler):
    """Reads plain data only (used to sniff the legacy magic number)."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids not allowed")


def _data_pkl(zf: zipfile.ZipFile, name: str) -> str:
    """The ``<archive>/data.pkl`` entry name."""
    found = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
    if len(found) != 1:
        problem = "no '<archive>/data.pkl' entry" if not found else f"several: {found}"
        raise TorchCheckpointError(
            f"{name}: zip archive with {problem}; expected a torch.save checkpoint "
            "(<archive>/data.pkl and <archive>/data/<key> entries)"
        )
    return found[0]


def _read_entry(zf: zipfile.ZipFile, entry: str, name: str, nbytes: int | None = None) -> Any:
    """The bytes of ``entry`` (``nbytes`` of them, into a uint8 array, if given)."""
    try:
        if nbytes is None:
            return zf.read(entry)
        buf = np.empty(nbytes, np.uint8)
        view = memoryview(buf)
        got = 0
        with zf.open(entry) as f:
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got == nbytes:
                f.read(1)  # reach the end, so zipfile checks the CRC
        if got < nbytes:
            raise TorchCheckpointError(f"{name}: truncated storage record {entry!r}: {got} bytes, expected {nbytes}")
        return buf
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
        if isinstance(e, TorchCheckpointError):
            raise
        raise TorchCheckpointError(
            f"{name}: truncated or corrupt zip archive (reading {entry!r}: {e}); {_ZIP_EXPECTED}, complete"
        ) from None


def _unpickle_archive(zf: zipfile.ZipFile, name: str) -> Any:
    pkl = _data_pkl(zf, name)
    prefix = pkl[: -len("data.pkl")]
    little = True
    if f"{prefix}byteorder" in zf.NameToInfo:
        order = _read_entry(zf, f"{prefix}byteorder", name).strip()
        if order not in (b"little", b"big"):
            raise TorchCheckpointError(f"{name}: unknown byteorder {order!r}; expected 'little' or 'big'")
        little = order == b"little"
    data = _read_entry(zf, pkl, name)
    unpickler = _StateDictUnpickler(zf, name, prefix, little, data)
    try:
        return unpickler.load()
    except TorchCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside a corrupt pickle
        raise TorchCheckpointError(
            f"{name}: corrupt {pkl!r} ({type(e).__name__}: {e}); expected the pickled "
            "state dict of a torch.save checkpoint"
        ) from None


# ---------------------------------------------------------------------------- legacy


def _load_legacy(name: str) -> Any:
    """The object in a legacy (pre-1.6, non-zip) ``torch.save`` file.

    Layout (torch/serialization.py ``_legacy_save``): four pickles, then the raw storages.
    The magic number, the protocol version (1001) and ``sys_info`` (``little_endian``);
    the object, whose storages are persistent ids ``('storage', storage_type, key,
    location, numel, view_metadata)``; the list of storage keys; then for each key in that
    order an int64 element count and ``count * itemsize`` bytes. The object is unpickled
    twice: once to learn the storages (nothing is called but the stand-ins), once to
    rebuild the tensors from their bytes.
    """
    data = Path(name).read_bytes()
    stream = io.BytesIO(data)
    try:
        for _ in range(2):  # magic number, protocol version
            _NothingUnpickler(stream).load()
        info = _NothingUnpickler(stream).load()
        little = bool(info.get("little_endian", True)) if isinstance(info, dict) else True
        start = stream.tell()
        survey = _LegacySurvey(name, data[start:], little)
        survey.load()
        stream.seek(start + survey.consumed())
        keys = _NothingUnpickler(stream).load()
    except TorchCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure inside a corrupt pickle
        raise TorchCheckpointError(
            f"{name}: corrupt legacy torch.save file ({type(e).__name__}: {e}); expected the pickled state dict"
        ) from None
    raw = _legacy_storages(name, data, stream.tell(), keys, survey.storages, little)
    return _LegacyUnpickler(name, data[start:], little, raw).load()


def _legacy_storages(
    name: str, data: bytes, pos: int, keys: Any, storages: dict[str, int], little: bool
) -> dict[str, np.ndarray]:
    """Each storage's bytes, read in ``keys`` order from ``data[pos:]``."""
    if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
        raise TorchCheckpointError(f"{name}: the storage key list does not match the storages the pickle names")
    raw: dict[str, np.ndarray] = {}
    order = "<" if little else ">"
    for key in map(str, keys):
        if pos + 8 > len(data):
            raise TorchCheckpointError(f"{name}: truncated legacy file at storage {key!r}")
        numel = int(np.frombuffer(data, f"{order}i8", 1, pos)[0])
        nbytes = numel * storages[key]
        if numel < 0 or pos + 8 + nbytes > len(data):
            raise TorchCheckpointError(
                f"{name}: truncated legacy storage {key!r}: expected {max(numel, 0)} elements at byte {pos + 8}"
            )
        raw[key] = np.frombuffer(data, np.uint8, nbytes, pos + 8).copy()
        pos += 8 + nbytes
    return raw


# ---------------------------------------------------------------------------- unpickler


class _StateDictUnpickler(pickle.Unpickler):
    """An unpickler that knows only what a state dict is made of (see the module docstring).

    Every allowed global resolves to a local stand-in; any other raises."""

    def __init__(self, zf: zipfile.ZipFile, name: str, prefix: str, little: bool, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self._zf = zf
        self._name = name
        self._prefix = prefix
        self._little = little
        self._raw: dict[str, np.ndarray] = {}  # storage key -> bytes; each read once

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils":
            if name == "_rebuild_tensor_v2":
                return self._rebuild_tensor_v2
            if name == "_rebuild_tensor_v3":
                return self._rebuild_tensor_v3
            if name == "_rebuild_parameter":
                return self._rebuild_parameter
            if name == "_rebuild_parameter_with_state":
                return self._rebuild_parameter_with_state
        if module in ("torch", "torch.storage"):
            if name in ("UntypedStorage", "TypedStorage", "_UntypedStorage", "_TypedStorage"):
                return _UNTYPED
            if module == "torch" and name in _STORAGE_CLASSES:
                return _StorageType(name, _DTYPES[_STORAGE_CLASSES[name]])
            if module == "torch" and name.endswith("Storage") and name.isidentifier():
                return _StorageType(name, None, known=False)  # e.g. QInt8Storage
            if module == "torch" and name in _DTYPES:
                return _DTYPES[name]
        raise TorchCheckpointError(
            f"{self._name}: refusing to load class/function '{module}.{name}' from the "
            "pickle (loading it could run arbitrary code); expected only tensors and plain "
            "containers (a state dict saved with torch.save(model.state_dict(), ...))"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
            raise TorchCheckpointError(
                f"{self._name}: unexpected persistent id {pid!r}; expected "
                "('storage', storage_type, key, location, numel)"
            )
        _, stype, key, _location, numel = pid
        if isinstance(stype, _DType):  # some writers pickle the dtype itself
            stype = _StorageType(stype.name, stype)
        if not isinstance(stype, _StorageType) or not stype.known:
            raise TorchCheckpointError(
                f"{self._name}: unknown storage dtype "
                f"{getattr(stype, 'name', stype)!r}; expected one of "
                f"{sorted(_STORAGE_CLASSES)} or UntypedStorage"
            )
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise TorchCheckpointError(
                f"{self._name}: malformed storage id {pid!r}; expected a string key and a non-negative element count"
            )
        dtype = stype.dtype
        if dtype is not None and dtype.storage_dtype is None:
            raise TorchCheckpointError(
                f"{self._name}: unknown storage dtype torch.{dtype.name} (no numpy "
                "equivalent); expected one of float32/float64/float16/bfloat16/int*/uint*/"
                "bool/complex"
            )
        itemsize = 1 if dtype is None else dtype.storage_dtype.itemsize
        nbytes = numel * itemsize
        raw = self._raw.get(key)
        if raw is None or raw.size < nbytes:
            entry = f"{self._prefix}data/{key}"
            info = self._zf.NameToInfo.get(entry)
            if info is None:
                raise TorchCheckpointError(
                    f"{self._name}: storage record {entry!r} is missing (truncated or "
                    f"incomplete archive); expected a complete torch.save checkpoint"
                )
            if info.file_size < nbytes:
                raise TorchCheckpointError(
                    f"{self._name}: truncated storage record {entry!r}: {info.file_size} "
                    f"bytes, expected {numel} x {itemsize} = {nbytes}"
                )
            raw = _read_entry(self._zf, entry, self._name, nbytes)
            self._raw[key] = raw
        return _Storage(key, raw[:nbytes], dtype)

    # Rebuild functions (the pickle calls these with the saved arguments) ----------------

    def _rebuild_tensor_v2(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> np.ndarray:
        return self._tensor(storage, storage_offset, size, stride, None)

    def _rebuild_tensor_v3(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any,
        backward_hooks: Any,
        dtype: Any,
        metadata: Any = None,
    ) -> np.ndarray:
        return self._tensor(storage, storage_offset, size, stride, dtype)

    def _rebuild_parameter(self, data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> np.ndarray:
        return self._check_array(data, "_rebuild_parameter")

    def _rebuild_parameter_with_state(
        self, data: Any, requires_grad: Any, backward_hooks: Any, state: Any
    ) -> np.ndarray:
        return self._check_array(data, "_rebuild_parameter_with_state")

    def _check_array(self, data: Any, fn: str) -> np.ndarray:
        if not isinstance(data, np.ndarray):
            raise TorchCheckpointError(f"{self._name}: {fn} got a {type(data).__name__}; expected a tensor")
        return data

    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: Any) -> np.ndarray:
        """Copy the ``size``/``stride`` view at ``offset`` of ``storage`` into an array."""
        if not isinstance(storage, _Storage):
            raise TorchCheckpointError(
                f"{self._name}: tensor rebuilt from a {type(storage).__name__}; expected a storage"
            )
        if dtype is None:
            dtype = storage.dtype if storage.dtype is not None else _DTYPES["uint8"]
        if not isinstance(dtype, _DType):
            raise TorchCheckpointError(f"{self._name}: tensor dtype {dtype!r}; expected a torch dtype")
        elem = dtype.storage_dtype
        if elem is None:
            raise TorchCheckpointError(
                f"{self._name}: unknown storage dtype torch.{dtype.name} (no numpy "
                "equivalent); expected one of float32/float64/float16/bfloat16/int*/uint*/"
                "bool/complex"
            )
        size, stride = tuple(size), tuple(stride)
        if not (
            isinstance(offset, int)
            and offset >= 0
            and len(size) == len(stride)
            and all(isinstance(v, int) and v >= 0 for v in size + stride)
        ):
            raise TorchCheckpointError(
                f"{self._name}: malformed tensor (offset {offset!r}, size {size!r}, stride "
                f"{stride!r}); expected non-negative integers"
            )
        elem = elem.newbyteorder("<" if self._little else ">") if elem.itemsize > 1 else elem
        raw = storage.raw
        if raw.size % elem.itemsize:
            raise TorchCheckpointError(
                f"{self._name}: storage {storage.key!r} has {raw.size} bytes, not a multiple "
                f"of {dtype.name}'s {elem.itemsize}; expected a whole number of elements"
            )
        if 0 in size:
            out = np.empty(size, elem)
        else:
            numel = raw.size // elem.itemsize
            last = offset + sum((n - 1) * s for n, s in zip(size, stride))
            if last >= numel:
                raise TorchCheckpointError(
                    f"{self._name}: tensor (offset {offset}, size {size}, stride {stride}) "
                    f"reaches element {last} of storage {storage.key!r} with {numel}; "
                    "expected it to lie inside its storage (truncated or corrupt file)"
                )
            typed = raw.view(elem)
            out = np.lib.stride_tricks.as_strided(
                typed[offset:],
                shape=size,
                strides=tuple(s * elem.itemsize for s in stride),
                writeable=False,
            )
        native = elem.newbyteorder("=")
        out = np.array(out, dtype=native, order="C", copy=True).view(native)
        if dtype.name == "bfloat16":
            bits = out.astype(np.uint32)
            bits <<= np.uint32(16)  # in place: a 0-d array stays an array
            out = bits.view(np.float32)
        return out


# ---------------------------------------------------------------------------- selection


def _flatten(tree: dict, prefix: str = "") -> tuple[dict[str, np.ndarray], str | None]:
    """``tree`` flattened with '.', and the first non-tensor leaf's path (None if none)."""
    out: dict[str, np.ndarray] = {}
    bad: str | None = None
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, np.ndarray):
            out[path] = v
        elif isinstance(v, dict) and v:
            sub, sub_bad = _flatten(v, f"{path}.")
            out.update(sub)
            bad = bad or sub_bad
        else:
            bad = bad or f"{path!r} is {_describe(v)}"
    return out, bad


def _describe(v: Any) -> str:
    if isinstance(v, dict):
        return "an empty dict"
    return f"a {type(v).__name__} ({v!r:.60})"


def _select_state_dict(obj: Any, name: str, key: str | None) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise TorchCheckpointError(
            f"{name}: the checkpoint holds {_describe(obj)}; expected a state dict (a dict "
            "of tensors) or a dict wrapping one"
        )
    keys = list(obj)
    if key is not None:
        if key in obj:
            sel = obj[key]
        else:
            sel = obj
            for part in key.split("."):
                if not (isinstance(sel, dict) and part in sel):
                    raise TorchCheckpointError(
                        f"{name}: no entry {key!r} in the checkpoint; expected one of the top-level keys {keys}"
                    )
                sel = sel[part]
        if not isinstance(sel, dict):
            raise TorchCheckpointError(
                f"{name}: entry {key!r} is {_describe(sel)}; expected a state dict (a dict of tensors)"
            )
        flat, bad = _flatten(sel)
        if bad:
            raise TorchCheckpointError(f"{name}: in entry {key!r}, {bad}; expected a tensor")
        return flat
    if all(isinstance(v, np.ndarray) for v in obj.values()):
        return dict(obj)
    found = []
    for k in _WRAPPER_KEYS:
        v = obj.get(k)
        if isinstance(v, dict):
            sub, sub_bad = _flatten(v)
            if not sub_bad:
                found.append((k, sub))
    if len(found) == 1:
        return found[0][1]
    flat, bad = _flatten(obj)
    if not bad and not found:
        return flat
    why = (
        f"several candidate state dicts {[k for k, _ in found]}"
        if found
        else f"it is not a dict of tensors ({bad}, expected a tensor) and no {'/'.join(_WRAPPER_KEYS)} entry is one"
    )
    raise TorchCheckpointError(
        f"{name}: cannot find the state dict: {why}; top-level keys: {keys}. Expected a "
        "dict of tensors; pass key=... to select one"
    )


class _LegacySurvey(_StateDictUnpickler):
    """First pass over a legacy file's object pickle: records every storage's key and
    element size, rebuilds nothing."""

    def __init__(self, name: str, data: bytes, little: bool) -> None:
        super().__init__(None, name, "", little, data)  # type: ignore[arg-type]
        self._stream = io.BytesIO(data)
        pickle.Unpickler.__init__(self, self._stream)
        self.storages: dict[str, int] = {}

    def consumed(self) -> int:
        return self._stream.tell()

    def persistent_load(self, pid: Any) -> _Storage:
        key, stype = _legacy_pid(self._name, pid)
        self.storages[key] = 1 if stype.dtype is None else stype.dtype.storage_dtype.itemsize
        return _Storage(key, np.empty(0, np.uint8), stype.dtype)

    def _tensor(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: Any) -> np.ndarray:
        return np.empty(0, np.float32)


class _LegacyUnpickler(_StateDictUnpickler):
    """Second pass: tensors rebuilt from the storages' bytes (views of a storage included)."""

    def __init__(self, name: str, data: bytes, little: bool, raw: dict[str, np.ndarray]) -> None:
        super().__init__(None, name, "", little, data)  # type: ignore[arg-type]
        self._raw = raw

    def persistent_load(self, pid: Any) -> _Storage:
        key, stype = _legacy_pid(self._name, pid)
        raw, view = self._raw[key], pid[5]
        if view is not None:  # (view key, element offset, element count) of the root storage
            itemsize = 1 if stype.dtype is None else stype.dtype.storage_dtype.itemsize
            raw = raw[view[1] * itemsize : (view[1] + view[2]) * itemsize]
        return _Storage(key, raw, stype.dtype)


def _legacy_pid(name: str, pid: Any) -> tuple[str, _StorageType]:
    """``(key, storage type)`` of a legacy persistent id, checked."""
    if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage")):
        raise TorchCheckpointError(
            f"{name}: unexpected persistent id {pid!r}; expected ('storage', type, key, location, numel, view)"
        )
    stype = pid[1]
    if not isinstance(stype, _StorageType) or not stype.known or stype.dtype is None:
        raise TorchCheckpointError(
            f"{name}: unknown storage type {getattr(stype, 'name', stype)!r}; "
            f"expected one of {sorted(_STORAGE_CLASSES)}"
        )
    if stype.dtype.storage_dtype is None:
        raise TorchCheckpointError(f"{name}: unknown storage dtype torch.{stype.dtype.name} (no numpy equivalent)")
    key = pid[2].decode("ascii", "replace") if isinstance(pid[2], bytes) else pid[2]
    if not isinstance(key, str):
        raise TorchCheckpointError(f"{name}: malformed storage id {pid!r}; expected a string key")
    return key, stype
