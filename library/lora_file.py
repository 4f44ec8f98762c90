"""Reading and writing LoRA state dicts: kohya ``.safetensors``, MindSpore
``.ckpt`` and torch-pickled ``.ckpt``/``.pt`` files, without torch (torch
files are read from any of those extensions and written for ``.pt``/``.pth``/
``.bin``: kohya's ``torch.save`` of the state dict, no metadata).

A state dict here is ``{name: numpy array}`` plus ``dtypes`` ``{name: "fp32" |
"fp16" | "bf16" | numpy dtype name}``: numpy has no bfloat16, so bf16 tensors
are held as the float32 arrays they convert to exactly, and written back as
bf16 bit for bit (bf16 -> fp32 -> bf16 is the identity).

``.safetensors`` files are written with the ``safetensors`` package, so the
tensor layout and data bytes are those torch kohya's ``save_file`` produces
(kohya's hash fields depend on them); bf16 tensors go through it as uint16 bit
patterns with the header's dtype rewritten to ``BF16``. The header is written
back in the package's JSON layout with the metadata in the caller's order (the
package itself orders metadata keys arbitrarily), so equal inputs give equal
bytes (checked against torch's ``safetensors`` in the tests).

Every problem with a file is a ``UserError`` with one line naming the file.
Writes are atomic: a temporary file in the same folder, then ``os.replace``.

The format-level pieces (bf16 bit conversion, safetensors dtype map and header
bytes, atomic write, content sniffing) are ``library.safetensors_io``'s, shared
with the SDXL checkpoint loader; ``float32_to_bf16_bits`` and
``bf16_bits_to_float32`` are re-exported here.
"""
import io
import json
import os
import pickle
import struct
import zipfile
from collections import OrderedDict

import numpy as np

from library.device_utils import UserError
from library.dtypes import canonical
from library.path_utils import check_input_file
from library.safetensors_io import (_ST_TO_NP, atomic_write as _atomic_write, bf16_bits_to_float32,  # noqa: F401
                                    decode_header, encode_header, float32_to_bf16_bits, sniff_format)

SAFETENSORS_EXT = ".safetensors"
CKPT_EXTS = (".ckpt", ".pt", ".pth", ".bin")
# written as torch.save() zip files (kohya: torch.save for every non-.safetensors name); ".ckpt" stays a
# MindSpore checkpoint here (it keeps the metadata).
TORCH_SAVE_EXTS = (".pt", ".pth", ".bin")
CKPT_METADATA_KEY = "__metadata__"  # MindSpore .ckpt: safetensors-style metadata, JSON in one string entry

_NP_TO_NAME = {np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}



def normalize_dtype(dtype):
    """'float'/'fp32'/'fp16'/'bf16' (or a MindSpore/numpy float dtype) -> 'fp32'|'fp16'|'bf16'; None stays None."""
    if dtype is None:
        return None
    name = canonical(dtype)
    if name is None:
        raise UserError(f"unknown precision '{dtype}': choose float (fp32), fp16 or bf16")
    return name


def cast_array(a, dtype):
    """Cast to 'fp32'/'fp16' numpy dtypes; 'bf16' rounds to the nearest bf16 value, kept as fp32."""
    dtype = normalize_dtype(dtype)
    a = np.asarray(a)
    if dtype == "fp32":
        return a.astype(np.float32)
    if dtype == "fp16":
        return a.astype(np.float16)
    return bf16_bits_to_float32(float32_to_bf16_bits(a.astype(np.float32))).reshape(a.shape)


def dtype_of(array, declared=None):
    if declared is not None:
        return declared
    return _NP_TO_NAME.get(np.asarray(array).dtype, np.asarray(array).dtype.name)


# ---------------------------------------------------------------------------
# safetensors


def serialize_safetensors(tensors, metadata=None, dtypes=None):
    """Bytes of a .safetensors file (the safetensors package's exact layout)."""
    import safetensors.numpy

    dtypes = dtypes or {}
    arrays = {}
    bf16 = set()
    for name, value in tensors.items():
        a = np.asarray(value)
        if dtypes.get(name) == "bf16":
            a = float32_to_bf16_bits(a.astype(np.float32)).reshape(a.shape)
            bf16.add(name)
        arrays[name] = np.ascontiguousarray(a).reshape(a.shape)  # keep 0-d (alpha) 0-d, as kohya's files
    if metadata is not None:
        metadata = {str(k): str(v) for k, v in metadata.items()}
    data = safetensors.numpy.save(arrays, metadata=metadata)
    # Rewrite the header: the package serialises metadata from a hash map (key order varies from run to
    # run); ours keeps the caller's order, so equal inputs give equal bytes. Tensor entries, offsets and
    # data are the package's.
    n = struct.unpack("<Q", data[:8])[0]
    header = decode_header(data[8:8 + n], "<safetensors output>")
    header.pop("__metadata__", None)
    for name in bf16:
        header[name]["dtype"] = "BF16"  # same element size as U16: offsets and order unchanged
    if metadata is not None:
        header = {"__metadata__": metadata, **header}
    return encode_header(header, ensure_ascii=False) + data[8 + n:]


def parse_safetensors(data: bytes, path="<bytes>"):
    """-> (tensors, metadata, dtypes) from .safetensors bytes; bf16 tensors come back as fp32."""
    if len(data) < 8:
        raise UserError(f"{path}: not a safetensors file (too short)")
    n = struct.unpack("<Q", data[:8])[0]
    if n <= 0 or 8 + n > len(data):
        raise UserError(f"{path}: not a safetensors file (bad header length {n})")
    header = decode_header(data[8:8 + n], path)
    metadata = header.pop("__metadata__", None) or {}
    body = memoryview(data)[8 + n:]
    tensors, dtypes = OrderedDict(), {}
    for name, info in header.items():
        try:
            st_dtype, shape, (begin, end) = info["dtype"], [int(s) for s in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: corrupt safetensors header entry for '{name}'") from None
        if st_dtype not in _ST_TO_NP:  # BF16 maps to uint16 (bit patterns)
            raise UserError(f"{path}: tensor '{name}' has unsupported dtype {st_dtype}")
        np_dtype = _ST_TO_NP[st_dtype]
        itemsize = np.dtype(np_dtype).itemsize
        count = int(np.prod(shape)) if shape else 1
        if not (0 <= begin <= end <= len(body)) or end - begin != count * itemsize:
            raise UserError(f"{path}: tensor '{name}' data is truncated or corrupt "
                            f"(offsets {begin}..{end}, file body {len(body)} bytes)")
        a = np.frombuffer(body[begin:end], dtype=np_dtype).reshape(shape)
        if st_dtype == "BF16":
            tensors[name] = bf16_bits_to_float32(a).reshape(shape)
            dtypes[name] = "bf16"
        else:
            tensors[name] = a.copy()
            dtypes[name] = dtype_of(a)
    return tensors, dict(metadata), dtypes


# ---------------------------------------------------------------------------
# torch pickles (read only, no torch import)


class _TorchStorageType:
    def __init__(self, name):
        self.name = name


_TORCH_STORAGE_DTYPES = {
    "FloatStorage": (np.float32, "fp32"), "HalfStorage": (np.float16, "fp16"),
    "BFloat16Storage": (np.uint16, "bf16"), "DoubleStorage": (np.float64, None),
    "LongStorage": (np.int64, None), "IntStorage": (np.int32, None), "ShortStorage": (np.int16, None),
    "CharStorage": (np.int8, None), "ByteStorage": (np.uint8, None), "BoolStorage": (np.bool_, None),
}
_TORCH_DTYPES = {"float32": "FloatStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
                 "float64": "DoubleStorage", "int64": "LongStorage", "int32": "IntStorage",
                 "int16": "ShortStorage", "int8": "CharStorage", "uint8": "ByteStorage", "bool": "BoolStorage"}


class _Storage:
    def __init__(self, raw: bytes, storage_name):
        self.np_dtype, self.kind = _TORCH_STORAGE_DTYPES[storage_name]
        self.array = np.frombuffer(raw, dtype=self.np_dtype)


class _TorchTensor:
    def __init__(self, storage, offset, size, stride):
        a = storage.array
        itemsize = a.itemsize
        size, stride = tuple(size), tuple(stride)
        if size:
            view = np.lib.stride_tricks.as_strided(a[offset:], shape=size,
                                                   strides=tuple(s * itemsize for s in stride))
        else:
            view = a[offset:offset + 1].reshape(())
        view = np.array(view)
        if storage.kind == "bf16":
            self.array, self.kind = bf16_bits_to_float32(view).reshape(size), "bf16"
        else:
            self.array, self.kind = view, storage.kind


def _rebuild_tensor(storage, offset, size, stride, *args, **kwargs):
    return _TorchTensor(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles torch.save() state dicts into numpy without importing torch."""

    def __init__(self, file, archive, prefix, path):
        super().__init__(file)
        self.archive, self.prefix, self.path = archive, prefix, path
        self.storages = {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _TORCH_STORAGE_DTYPES:
            return _TorchStorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchStorageType(_TORCH_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "builtins" and name in ("dict", "list", "tuple", "set", "str", "int", "float"):
            return getattr(__import__("builtins"), name)
        raise UserError(f"{self.path}: torch checkpoint holds an object this loader does not read "
                        f"({module}.{name}); save the LoRA as .safetensors instead")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UserError(f"{self.path}: unsupported torch checkpoint entry {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if key not in self.storages:
            name = storage_type.name if isinstance(storage_type, _TorchStorageType) else "ByteStorage"
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise UserError(f"{self.path}: torch checkpoint is missing tensor data {key}") from None
            self.storages[key] = _Storage(raw, name)
        return self.storages[key]


def read_torch_pickle(path):
    """torch.save() zip file (state dict of tensors) -> (tensors, metadata {}, dtypes)."""
    try:
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if not pkl:
                raise UserError(f"{path}: zip file is not a torch checkpoint (no data.pkl)")
            prefix = pkl[0][:-len("data.pkl")]
            with archive.open(pkl[0]) as f:
                obj = _TorchUnpickler(f, archive, prefix, path).load()
    except (zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, struct.error) as e:
        raise UserError(f"{path}: corrupt torch checkpoint ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UserError(f"{path}: torch checkpoint does not hold a state dict")
    tensors, dtypes = OrderedDict(), {}
    for k, v in obj.items():
        if isinstance(v, _TorchTensor):
            tensors[str(k)] = v.array
            dtypes[str(k)] = v.kind or dtype_of(v.array)
        else:
            raise UserError(f"{path}: entry '{k}' is not a tensor ({type(v).__name__})")
    return tensors, {}, dtypes


# torch.save() zip files (written without torch): the layout torch's zip serializer produces -- records
# under one folder named after the file, each record's data 64-byte aligned (the local header's "FB"
# extra field pads it, so torch.load(mmap=True) can map the storages), data.pkl a protocol 2 pickle of an
# OrderedDict {name: torch._utils._rebuild_tensor_v2(persistent storage id, offset, size, stride,
# requires_grad, backward_hooks)}, one storage per tensor in data/<i>, little endian. No
# .data/serialization_id: torch writes a random one (optional when loading); leaving it out keeps equal
# inputs giving equal bytes.

_NP_TO_TORCH_STORAGE = {np.dtype(np_dtype): name for name, (np_dtype, _) in _TORCH_STORAGE_DTYPES.items()
                        if name != "BFloat16Storage"}
_TORCH_ALIGNMENT = 64
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip entry can carry; torch's writer leaves it zero


def _pickle_global(module, name):
    return b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n"


def _pickle_str(text):
    data = str(text).encode("utf-8")
    return b"X" + struct.pack("<I", len(data)) + data


def _pickle_int(n):
    n = int(n)
    if 0 <= n < 0x100:
        return b"K" + struct.pack("<B", n)
    if 0 <= n < 0x10000:
        return b"M" + struct.pack("<H", n)
    if -0x80000000 <= n < 0x80000000:
        return b"J" + struct.pack("<i", n)
    data = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + struct.pack("<B", len(data)) + data  # LONG1


def _pickle_tuple(items):
    items = [_pickle_int(i) for i in items]
    if len(items) <= 3:
        return b"".join(items) + (b")", b"\x85", b"\x86", b"\x87")[len(items)]
    return b"(" + b"".join(items) + b"t"


def _torch_state_dict_pickle(entries):
    """data.pkl bytes: entries are (name, storage class name, storage key, numel, shape)."""
    empty_ordered_dict = _pickle_global("collections", "OrderedDict") + b")R"
    out = [b"\x80\x02", empty_ordered_dict]
    for start in range(0, len(entries), 1000):  # SETITEMS batches of 1000, as pickle's own writer
        out.append(b"(")
        for name, storage, key, numel, shape in entries[start:start + 1000]:
            stride = [int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))]
            pid = (b"(" + _pickle_str("storage") + _pickle_global("torch", storage) + _pickle_str(key)
                   + _pickle_str("cpu") + _pickle_int(numel) + b"t")
            out += [_pickle_str(name), _pickle_global("torch._utils", "_rebuild_tensor_v2"),
                    b"(", pid, b"Q", _pickle_int(0), _pickle_tuple(shape), _pickle_tuple(stride),
                    b"\x89", empty_ordered_dict, b"tR"]
        out.append(b"u")
    out.append(b".")
    return b"".join(out)


def _torch_archive_name(path):
    """torch names the records' folder after the file (its name without the extension)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    ok = stem and all(c.isascii() and (c.isalnum() or c in "-_.") for c in stem)
    return stem if ok else "archive"


def serialize_torch_zip(tensors, dtypes=None, archive_name="archive"):
    """Bytes of a file ``torch.load`` reads as an OrderedDict of tensors (what kohya's ``torch.save(state_dict)``
    writes); bf16 tensors (held as fp32, see the module doc) are stored as torch bfloat16."""
    dtypes = dtypes or {}
    entries, storages = [], []
    for i, (name, value) in enumerate(tensors.items()):
        a = np.asarray(value)
        shape = tuple(int(d) for d in a.shape)
        if dtypes.get(name) == "bf16":
            data, storage = float32_to_bf16_bits(a.astype(np.float32)), "BFloat16Storage"
        else:
            storage = _NP_TO_TORCH_STORAGE.get(a.dtype)
            if storage is None:
                raise UserError(f"tensor '{name}': dtype {a.dtype} cannot be written to a torch file")
            data = a
        data = np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<"))
        entries.append((str(name), storage, str(i), data.size, shape))
        storages.append(data.tobytes())

    records = [("data.pkl", _torch_state_dict_pickle(entries)), (".format_version", b"1"),
               (".storage_alignment", str(_TORCH_ALIGNMENT).encode()), ("byteorder", b"little")]
    records += [(f"data/{i}", raw) for i, raw in enumerate(storages)]
    records.append(("version", b"3\n"))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for rel, payload in records:
            info = zipfile.ZipInfo(f"{archive_name}/{rel}", date_time=_ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            # local header: 30 bytes + name + extra; pad the extra so the data starts on the alignment
            start = buf.tell() + 30 + len(info.filename.encode("utf-8")) + 4
            pad = -start % _TORCH_ALIGNMENT
            info.extra = b"FB" + struct.pack("<H", pad) + b"\0" * pad
            archive.writestr(info, payload)
    return buf.getvalue()


# ---------------------------------------------------------------------------
# MindSpore .ckpt


def read_mindspore_ckpt(path):
    import mindspore as ms

    try:
        loaded = ms.load_checkpoint(path)
    except Exception as e:  # noqa: BLE001  (MindSpore raises ValueError/RuntimeError for bad files)
        raise UserError(f"{path}: not a readable MindSpore checkpoint ({str(e).splitlines()[0][:200]})") from None
    tensors, dtypes, metadata = OrderedDict(), {}, {}
    for name, value in loaded.items():
        if name == CKPT_METADATA_KEY and isinstance(value, str):
            try:
                metadata = json.loads(value)
            except json.JSONDecodeError:
                raise UserError(f"{path}: corrupt metadata entry") from None
            continue
        if isinstance(value, str):
            continue
        if value.dtype == ms.bfloat16:
            tensors[name] = value.astype(ms.float32).asnumpy()
            dtypes[name] = "bf16"
        else:
            tensors[name] = value.asnumpy()
            dtypes[name] = dtype_of(tensors[name])
        if name.endswith(".alpha") and tensors[name].size == 1:
            tensors[name] = tensors[name].reshape(())  # scalar in kohya's files; a .ckpt stores shape [1]
    return tensors, metadata, dtypes


def serialize_mindspore_ckpt(path, tensors, metadata=None, dtypes=None):
    import mindspore as ms
    from mindspore import Tensor

    dtypes = dtypes or {}
    entries = []
    for name, value in tensors.items():
        a = np.asarray(value)
        if dtypes.get(name) == "bf16":
            t = Tensor(a.astype(np.float32), dtype=ms.bfloat16)
        else:
            t = Tensor(np.ascontiguousarray(a))
        entries.append({"name": name, "data": t})
    append = None
    if metadata:
        append = {CKPT_METADATA_KEY: json.dumps({str(k): str(v) for k, v in metadata.items()}, ensure_ascii=False)}
    ms.save_checkpoint(entries, path, append_dict=append)


# ---------------------------------------------------------------------------
# entry points


_SNIFFED_KIND = {"safetensors": "safetensors", "mindspore": "mindspore", "torch-zip": "torch",
                 "torch-pickle": "torch-legacy"}


def file_kind(path):
    """'safetensors' | 'torch' | 'torch-legacy' | 'mindspore' from the file's content
    (``safetensors_io.sniff_format``); content not recognised: by extension, else 'mindspore'."""
    kind = sniff_format(path)
    if kind == "unknown":
        return "safetensors" if path.lower().endswith(SAFETENSORS_EXT) else "mindspore"
    return _SNIFFED_KIND[kind]


def load_state_dict_file(path):
    """-> (tensors, metadata, dtypes) from a .safetensors, MindSpore .ckpt or torch .ckpt/.pt file."""
    check_input_file(path, "a weights file")
    kind = file_kind(path)
    if kind == "safetensors":
        with open(path, "rb") as f:
            data = f.read()
        return parse_safetensors(data, path)
    if kind == "torch":
        return read_torch_pickle(path)
    if kind == "torch-legacy":
        raise UserError(f"{path}: legacy (pre-zip) torch pickle format is not supported; "
                        "re-save it with a current torch or as .safetensors")
    return read_mindspore_ckpt(path)


def read_safetensors_metadata(path):
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path}: not a safetensors file (too short)")
        n = struct.unpack("<Q", head)[0]
        header = decode_header(f.read(n), path)
    return dict(header.get("__metadata__") or {})


def save_state_dict_file(path, tensors, metadata=None, dtypes=None):
    """Write ``tensors`` to ``path``, atomically: .safetensors (kohya layout), MindSpore .ckpt (with the
    metadata), or for .pt/.pth/.bin a torch.save() zip file without metadata (kohya's torch.save writes the
    bare state dict)."""
    ext = os.path.splitext(path)[1].lower()
    if ext in (SAFETENSORS_EXT,) + TORCH_SAVE_EXTS:
        if ext == SAFETENSORS_EXT:
            data = serialize_safetensors(tensors, metadata, dtypes)
        else:
            data = serialize_torch_zip(tensors, dtypes, _torch_archive_name(path))

        def write(tmp):
            with open(tmp, "wb") as f:
                f.write(data)
    elif ext in CKPT_EXTS:
        def write(tmp):
            # MindSpore appends ".ckpt" to names without it: write to a .ckpt temp then move
            target = tmp + ".ckpt"
            try:
                serialize_mindspore_ckpt(target, tensors, metadata, dtypes)
                os.replace(target, tmp)
            finally:
                if os.path.exists(target):
                    os.remove(target)
    else:
        raise UserError(f"{path}: unknown weights file extension '{ext}' (use .safetensors, .ckpt or .pt)")
    _atomic_write(path, write)
