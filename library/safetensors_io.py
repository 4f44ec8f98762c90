"""Streaming readers and writers for the weight files of SDXL checkpoints.

Nothing here imports mindspore or torch: tensors are numpy arrays.

* ``SafetensorsReader``: a ``.safetensors`` file (8-byte little-endian header
  length, JSON header, raw little-endian data). Tensors are read one at a
  time with plain file reads (no mmap: mapped pages would count towards the
  process' resident memory for as long as the file stays mapped). bfloat16 has
  no numpy type: it is widened to float32 exactly (the 16 bits become the
  high half of a float32); ``raw_dtype`` tells the stored type.
* ``MsCheckpointReader``: a MindSpore ``.ckpt`` (protobuf ``Checkpoint``:
  repeated ``Value{tag, TensorProto{dims, tensor_type, tensor_content}}``,
  tensors over 512 MiB split into consecutive values with the same tag). The
  wire format is walked once to index every tensor's byte ranges; data is read
  per tensor. Only the plain (unencrypted) format is read.
* ``write_safetensors`` / ``write_ms_checkpoint``: write from a list of
  ``(name, raw_dtype, shape, producer)`` where ``producer()`` returns the
  array when its turn comes, so at most one tensor is converted at a time.
  Output goes to a temporary file in the same folder, renamed at the end: a
  failure never leaves a half-written file under the final name.
* ``sniff_format``: tells safetensors, MindSpore protobuf checkpoints and torch
  pickles (zip or legacy pickle) apart by content, never by extension.
* Shared with ``library.lora_file`` (LoRA files): the bf16 bit conversions,
  the dtype maps, ``encode_header`` / ``decode_header`` (safetensors header
  bytes), ``atomic_write`` and ``sniff_format``.

Every format problem raises ``library.device_utils.UserError`` with one line
naming the file.
"""
import json
import os
import struct

import numpy as np

from library.device_utils import UserError
from library.path_utils import atomic_write, check_input_file  # noqa: F401  (atomic_write: for library.lora_file)

# safetensors dtype name -> numpy dtype (BF16 is read as float32, see module doc)
_ST_TO_NP = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}
_NP_TO_ST = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
    np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
    np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL",
}
# MindSpore checkpoint tensor_type <-> safetensors dtype name
_MS_TO_ST = {
    "Float64": "F64", "Float32": "F32", "Float16": "F16", "BFloat16": "BF16",
    "Int64": "I64", "Int32": "I32", "Int16": "I16", "Int8": "I8",
    "UInt64": "U64", "UInt32": "U32", "UInt16": "U16", "UInt8": "U8", "Bool": "BOOL",
}
_ST_TO_MS = {v: k for k, v in _MS_TO_ST.items()}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

MAX_HEADER_BYTES = 100 * 1024 * 1024


def st_dtype_of(array) -> str:
    """safetensors dtype name of a numpy array (float32 is F32: bf16 is chosen explicitly)."""
    try:
        return _NP_TO_ST[np.dtype(array.dtype)]
    except KeyError:
        raise UserError(f"cannot store numpy dtype {array.dtype} in a checkpoint") from None


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 (exact)."""
    bits = np.asarray(bits, np.uint16)
    return (bits.reshape(-1).astype(np.uint32) << np.uint32(16)).view(np.float32).reshape(bits.shape)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 bfloat16 bit patterns, round to nearest even (as torch's .to(bfloat16)).

    NaN stays NaN and is never rounded to inf: the payload's top bits are kept (so bf16 -> fp32 -> bf16
    is the identity for every bit pattern); a NaN whose kept payload would be zero gets the quiet bit."""
    shape = np.shape(x)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    u = x.view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        top = (u[nan] >> 16).astype(np.uint16)
        rounded[nan] = np.where((top & np.uint16(0x7F)) == 0, top | np.uint16(0x40), top)
    return rounded.reshape(shape)


def to_raw(array: np.ndarray, raw_dtype: str) -> np.ndarray:
    """Convert an array to the numpy representation of ``raw_dtype`` (bf16 -> uint16 bits)."""
    if raw_dtype == "BF16":
        if array.dtype == np.uint16:  # already bit patterns
            return array
        return float32_to_bf16_bits(np.asarray(array, np.float32))
    return np.asarray(array, _ST_TO_NP[raw_dtype])


def sniff_format(path: str) -> str:
    """'safetensors', 'mindspore', 'torch-zip', 'torch-pickle', or 'unknown' (by content)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    if len(head) >= 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER_BYTES and head[8:9] == b"{":
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return "torch-pickle"
    # protobuf Checkpoint: field 1, wire type 2 (0x0a), then a varint length,
    # then Value field 1 (tag string, 0x0a)
    if head[:1] == b"\x0a":
        i = 1
        while i < len(head) and head[i] & 0x80:
            i += 1
        if i + 1 < len(head) and head[i + 1:i + 2] == b"\x0a":
            return "mindspore"
    return "unknown"


PICKLE_MESSAGE = (
    "{path}: this is a PyTorch pickle checkpoint; it is not loaded because unpickling can run "
    "arbitrary code. Convert it to safetensors once, in an environment you trust, e.g. "
    "python -c \"import torch, safetensors.torch as st; sd = torch.load('{path}', map_location='cpu', "
    "weights_only=True); sd = sd.get('state_dict', sd); "
    "st.save_file({{k: v.contiguous() for k, v in sd.items() if hasattr(v, 'contiguous')}}, "
    "'{stem}.safetensors')\"")


def refuse_pickle(path: str):
    raise UserError(PICKLE_MESSAGE.format(path=path, stem=os.path.splitext(path)[0]))


class TensorInfo:
    __slots__ = ("name", "raw_dtype", "shape", "ranges")

    def __init__(self, name, raw_dtype, shape, ranges):
        self.name = name
        self.raw_dtype = raw_dtype
        self.shape = tuple(int(s) for s in shape)
        self.ranges = ranges  # [(absolute offset, nbytes), ...]

    @property
    def nbytes(self):
        return sum(n for _, n in self.ranges)


class _Reader:
    """Common part: ``infos`` name -> TensorInfo, per-tensor reads."""

    def __init__(self, path):
        self.path = path
        self.infos = {}
        self.metadata = {}
        self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def keys(self):
        return list(self.infos)

    def __contains__(self, name):
        return name in self.infos

    def shape(self, name):
        return self.infos[name].shape

    def raw_dtype(self, name):
        return self.infos[name].raw_dtype

    def get_raw(self, name) -> np.ndarray:
        """The tensor in its stored representation (bf16 as uint16 bit patterns)."""
        info = self.infos[name]
        np_dtype = np.dtype(_ST_TO_NP[info.raw_dtype])
        count = int(np.prod(info.shape, dtype=np.int64))
        if count * np_dtype.itemsize != info.nbytes:
            raise UserError(f"{self.path}: tensor {name} has {info.nbytes} bytes, "
                            f"expected {count * np_dtype.itemsize} for {info.raw_dtype} {list(info.shape)}")
        if self._file is None:
            self._file = open(self.path, "rb")
        out = np.empty(count, np_dtype)
        view = memoryview(out.view(np.uint8))
        pos = 0
        for offset, nbytes in info.ranges:
            self._file.seek(offset)
            got = self._file.readinto(view[pos:pos + nbytes])
            if got != nbytes:
                raise UserError(f"{self.path}: file is truncated (tensor {name} ends past the end of the file)")
            pos += nbytes
        return out.reshape(info.shape)

    def get(self, name) -> np.ndarray:
        """The tensor as numpy (bf16 widened to float32)."""
        raw = self.get_raw(name)
        if self.infos[name].raw_dtype == "BF16":
            return bf16_bits_to_float32(raw)
        return raw


class SafetensorsReader(_Reader):
    def __init__(self, path):
        super().__init__(path)
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise UserError(f"{path}: not a safetensors file (only {len(head)} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise UserError(f"{path}: not a valid safetensors file or truncated (header of {n} bytes, "
                                f"file of {size} bytes)")
            header = decode_header(f.read(n), path)
        self.metadata = header.pop("__metadata__", None) or {}
        base = 8 + n
        end_max = 0
        for name, entry in header.items():
            try:
                dtype = entry["dtype"]
                shape = entry["shape"]
                start, stop = entry["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{path}: corrupt safetensors header entry for {name}") from None
            if dtype not in _ST_TO_NP:
                raise UserError(f"{path}: tensor {name} has unsupported dtype {dtype}")
            if not 0 <= start <= stop:
                raise UserError(f"{path}: corrupt safetensors header entry for {name}")
            self.infos[name] = TensorInfo(name, dtype, shape, [(base + start, stop - start)])
            end_max = max(end_max, stop)
        if base + end_max > size:
            raise UserError(f"{path}: file is truncated ({size} bytes, the header describes "
                            f"{base + end_max})")


def decode_header(raw: bytes, path) -> dict:
    """The JSON object of a safetensors header (``raw``: the bytes after the 8-byte length), key order kept."""
    try:
        header = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def encode_header(header: dict, ensure_ascii=True) -> bytes:
    """8-byte little-endian length + compact JSON ``header``, padded with spaces to a multiple of 8 so the
    data section is aligned (the safetensors package's layout when ``ensure_ascii`` is False)."""
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=ensure_ascii).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def _varint(buf, pos, end):
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf, pos, end):
    """Yield (field number, wire type, value or (start, stop)) of a protobuf message."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos, end)
            yield field, wire, value
        elif wire == 2:
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise ValueError("length-delimited field runs past its message")
            yield field, wire, (pos, pos + n)
            pos += n
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != end:
        raise ValueError("message overruns its length")


class MsCheckpointReader(_Reader):
    """Index of a plain MindSpore ``.ckpt``; tensors read one at a time."""

    def __init__(self, path):
        super().__init__(path)
        import mmap

        size = os.path.getsize(path)
        if size == 0:
            raise UserError(f"{path}: empty file")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            end = size
            # optional trailer written with crc_check=True: b"crc_num" + 10 bytes
            if size >= 17 and buf[size - 17:size - 10] == b"crc_num":
                end = size - 17
            try:
                self._index(buf, end)
            except ValueError as e:
                raise UserError(f"{path}: not a valid MindSpore checkpoint or truncated ({e}); "
                                "encrypted checkpoints are not supported") from None

    def _index(self, buf, end):
        pos = 0
        last = None
        while pos < end:
            key, pos = _varint(buf, pos, end)
            if key != 0x0A:  # Checkpoint.value, length-delimited
                raise ValueError(f"unexpected field key {key:#x} at byte {pos}")
            n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise ValueError("a tensor record runs past the end of the file")
            tag = None
            tensor = None
            for field, wire, value in _fields(buf, pos, pos + n):
                if field == 1 and wire == 2:
                    tag = bytes(buf[value[0]:value[1]]).decode("utf-8")
                elif field == 2 and wire == 2:
                    tensor = value
            pos += n
            if tag is None or tensor is None:
                raise ValueError("record without a tag or tensor (map parameters are not supported)")
            dims = []
            ttype = None
            content = (0, 0)
            for field, wire, value in _fields(buf, tensor[0], tensor[1]):
                if field == 1 and wire == 0:
                    dims.append(value)
                elif field == 1 and wire == 2:  # packed dims
                    p, stop = value
                    while p < stop:
                        d, p = _varint(buf, p, stop)
                        dims.append(d)
                elif field == 2 and wire == 2:
                    ttype = bytes(buf[value[0]:value[1]]).decode("utf-8")
                elif field == 3 and wire == 2:
                    content = value
            if ttype not in _MS_TO_ST:
                raise ValueError(f"tensor {tag} has unsupported type {ttype}")
            if dims == [0]:
                dims = []
            rng = (content[0], content[1] - content[0])
            if last is not None and last.name == tag:  # a slice of a large tensor
                last.ranges.append(rng)
                continue
            if tag in self.infos:
                raise ValueError(f"tensor {tag} appears twice")
            last = TensorInfo(tag, _MS_TO_ST[ttype], dims, [rng])
            self.infos[tag] = last


def open_weights(path):
    """Reader for a safetensors file or a MindSpore checkpoint, chosen by content."""
    check_input_file(path, "a weights file")
    kind = sniff_format(path)
    if kind == "safetensors":
        return SafetensorsReader(path)
    if kind == "mindspore":
        return MsCheckpointReader(path)
    if kind in ("torch-zip", "torch-pickle"):
        refuse_pickle(path)
    raise UserError(f"{path}: not a checkpoint (neither safetensors nor a MindSpore .ckpt)")


def _atomic_write_stream(path, write):
    """``atomic_write`` for a ``write(f)`` that writes to an open binary file."""
    def to_file(tmp):
        with open(tmp, "wb") as f:
            write(f)

    atomic_write(path, to_file)


def _nbytes(raw_dtype, shape):
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(_ST_TO_NP[raw_dtype]).itemsize


def _produce(name, raw_dtype, shape, producer):
    data = np.asarray(to_raw(producer(), raw_dtype))
    data = np.ascontiguousarray(data).reshape(data.shape)  # (ascontiguousarray makes 0-d arrays 1-d)
    if tuple(data.shape) != tuple(shape):
        raise ValueError(f"{name}: produced shape {data.shape}, declared {tuple(shape)}")
    return data


def write_safetensors(path, entries, metadata=None):
    """Write ``entries`` = [(name, raw_dtype, shape, producer)] as safetensors (header first,
    then each tensor as it is produced). ``metadata``: str -> str."""
    header = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, raw_dtype, shape, _ in entries:
        n = _nbytes(raw_dtype, shape)
        header[name] = {"dtype": raw_dtype, "shape": [int(s) for s in shape], "data_offsets": [offset, offset + n]}
        offset += n
    blob = encode_header(header)

    def write(f):
        f.write(blob)
        for name, raw_dtype, shape, producer in entries:
            f.write(memoryview(_produce(name, raw_dtype, shape, producer)).cast("B"))

    _atomic_write_stream(path, write)


def _enc_varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _enc_bytes(field, payload):
    return _enc_varint((field << 3) | 2) + _enc_varint(len(payload)) + payload


MS_SLICE_BYTES = 512 * 1024 * 1024  # as mindspore.train.serialization.SLICE_SIZE


def write_ms_checkpoint(path, entries):
    """Write ``entries`` as a plain MindSpore ``.ckpt`` (loadable by ``mindspore.load_checkpoint``);
    tensors over 512 MiB are split along axis 0 as MindSpore does."""

    def write(f):
        for name, raw_dtype, shape, producer in entries:
            data = _produce(name, raw_dtype, shape, producer)
            dims = list(shape) if len(shape) else [0]
            dims_payload = b"".join(_enc_varint(d) for d in dims)
            slices = [data]
            if data.nbytes > MS_SLICE_BYTES and data.ndim:
                slices = np.array_split(data, int(np.ceil(data.nbytes / MS_SLICE_BYTES)))
            for part in slices:
                content = np.ascontiguousarray(part).tobytes()
                tensor = (_enc_bytes(1, dims_payload) + _enc_bytes(2, _ST_TO_MS[raw_dtype].encode())
                          + _enc_bytes(3, content))
                value = _enc_bytes(1, name.encode("utf-8")) + _enc_bytes(2, tensor)
                f.write(_enc_bytes(1, value))

    _atomic_write_stream(path, write)
