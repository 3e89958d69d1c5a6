"""Hugging Face weight files, read and written one tensor at a time: safetensors, and legacy `.bin`.

safetensors: an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
then raw little-endian bytes. We read it ourselves because the `safetensors` numpy API has no bf16,
and one memmap per tensor (released after use) keeps resident memory at one tensor, not one shard.
Legacy `pytorch_model*.bin` files are read with `torch.load(weights_only=True)`: this is the one module that
imports torch (an optional extra, only for those files).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import math
import os
import pathlib
import struct
from collections.abc import Callable, Iterator, Sequence

import ml_dtypes
import numpy as np

from mellama_jax.errors import UserError

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip
_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
_FLOATS = {np.dtype(SAFETENSORS_DTYPES[k]) for k in ("F64", "F32", "F16", "BF16")}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`

    def read(self) -> np.ndarray:
        """The tensor, memory-mapped read-only; dropping it releases the mapping."""
        if math.prod(self.shape) == 0:
            return np.zeros(self.shape, self.dtype)
        return np.memmap(self.file, dtype=self.dtype, mode="r", offset=self.offset, shape=self.shape)


def read_safetensors_index(path: pathlib.Path) -> dict[str, TensorInfo]:
    """Every tensor's dtype, shape and location, from the header alone; checked against the file's size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise TypeError(f"the header is a JSON {type(header).__name__}, not an object")
        header.pop("__metadata__", None)
        index = {name: _tensor_info(path, name, h, 8 + length) for name, h in header.items()}
    except (OSError, struct.error, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    for name, h in header.items():  # a file cut short (an interrupted download) would fail later, in np.memmap
        if h["data_offsets"][1] > size - 8 - length:
            raise UserError(
                f"{path}: truncated: tensor {name!r} ends at data byte {h['data_offsets'][1]}, "
                f"the file holds {size - 8 - length}"
            )
    return index


def _tensor_info(path: pathlib.Path, name: str, h: dict, data_start: int) -> TensorInfo:
    dtype, shape, (begin, end) = np.dtype(SAFETENSORS_DTYPES[h["dtype"]]), tuple(h["shape"]), h["data_offsets"]
    if not all(type(n) is int and n >= 0 for n in (*shape, begin, end)):
        raise ValueError(f"tensor {name!r}: shape {h['shape']} or data_offsets {h['data_offsets']} not whole numbers")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name!r}: data_offsets {[begin, end]} do not hold {h['dtype']}{list(shape)}")
    return TensorInfo(path, dtype, shape, data_start + begin)


def rope_buffer_mismatch(values: np.ndarray, theta: float, head_dim: int) -> str | None:
    """Where a stored RoPE `inv_freq` buffer differs from 1 / theta ** (arange(0, H, 2) / H); None if nowhere."""
    want = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)  # float64
    if values.shape != want.shape or values.dtype not in _FLOATS:
        return f"{values.dtype}{list(values.shape)}, not {want.size} frequencies"
    # transformers computes it in float32, where rounding the exponent arange / H (an ulp) grows ln(theta)-fold
    # in theta ** x; storing it in bf16/fp16 rounds once more (half that dtype's eps, or a subnormal step for
    # fp16's tiny values). transformers' own buffers use at most half this bound (H <= 300, theta <= 5e7).
    info = ml_dtypes.finfo(values.dtype)
    rtol = info.eps + abs(math.log(theta)) * ml_dtypes.finfo(np.float32).eps
    got = np.asarray(values, np.float64)
    error = np.nan_to_num(np.abs(got - want) - rtol * want - info.smallest_subnormal, nan=np.inf)
    k = int(np.argmax(error))
    return f"element {k} is {got[k]:.7g}, expected {want[k]:.7g}" if error[k] > 0 else None


def plan_shards(specs: Sequence[tuple[str, tuple[int, ...], np.dtype]], max_shard_bytes: int) -> list[list[int]]:
    """Tensors (in order) grouped into shards of at most `max_shard_bytes` (a bigger tensor gets its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def _prefetched(make: Callable[[int], np.ndarray], order: Sequence[int]) -> Iterator[np.ndarray]:
    """`make(i)` for each i in order; the next one is made on a worker thread while the caller uses this one."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        ahead = None
        for i in order:
            future = pool.submit(make, i)
            if ahead is not None:
                yield ahead.result()
            ahead = future
        if ahead is not None:
            yield ahead.result()


def write_safetensors_shards(
    specs: Sequence[tuple[str, tuple[int, ...], np.dtype]],
    get: Callable[[str], np.ndarray],
    out_dir: pathlib.Path,
    max_shard_bytes: int,
) -> None:
    """`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, holding two tensors at a time."""
    shards = plan_shards(specs, max_shard_bytes)
    weight_map, total = {}, 0
    arrays = _prefetched(lambda i: np.ascontiguousarray(get(specs[i][0])), [i for m in shards for i in m])
    for s, members in enumerate(shards, start=1):
        name = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in members:
            key, shape, dtype = specs[i]
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            header[key] = {
                "dtype": _DTYPE_NAMES[np.dtype(dtype)],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[key] = name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        with open(out_dir / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for i in members:
                key, shape, dtype = specs[i]
                array = next(arrays)
                if array.shape != tuple(shape) or array.dtype != np.dtype(dtype):
                    raise ValueError(f"{key}: got {array.dtype}{array.shape}, planned {np.dtype(dtype)}{tuple(shape)}")
                f.write(memoryview(array.reshape(-1).view(np.uint8)))
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _indexed_files(hf_dir: pathlib.Path, index_name: str, pattern: str) -> list[pathlib.Path]:
    index = hf_dir / index_name
    if not index.is_file():
        return sorted(hf_dir.glob(pattern))
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (json.JSONDecodeError, KeyError, AttributeError) as e:
        raise UserError(f"{index}: not a weights index ({type(e).__name__}: {e})") from None
    missing = [n for n in names if not (hf_dir / n).is_file()]
    if missing:
        raise UserError(f"{index}: names shard {missing[0]!r}, which is not in {hf_dir}")
    return [hf_dir / n for n in names]


def hf_weight_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of an HF folder: safetensors (from the index, or the files themselves), else `.bin`."""
    files = _indexed_files(hf_dir, "model.safetensors.index.json", "model*.safetensors")
    if not files:
        files = _indexed_files(hf_dir, "pytorch_model.bin.index.json", "pytorch_model*.bin")
    if not files:
        raise UserError(f"{hf_dir}: no model.safetensors, model-*.safetensors or pytorch_model*.bin weights")
    return files


# Legacy `pytorch_model*.bin`: opened only with `torch.load(weights_only=True, mmap=True)`, which refuses to
# unpickle anything but tensors and containers. torch is an optional extra, imported only for these files.


@dataclasses.dataclass(frozen=True)
class TorchTensor:
    """A tensor of a memory-mapped legacy `.bin` state dict."""

    tensor: object  # torch.Tensor; torch is an optional extra, imported only to read `.bin` files

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.read().dtype

    def read(self) -> np.ndarray:
        import torch

        t = self.tensor
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _read_torch_bin(path: pathlib.Path) -> dict[str, TorchTensor]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path}: reading legacy .bin weights needs torch: pip install 'mellama-jax[hf]'") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types (UnpicklingError, RuntimeError, ...) for unsafe or bad files
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
        raise UserError(f"{path}: not a tensors-only PyTorch state dict, refused ({reason[:160]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a flat dict of tensors")
    return {name: TorchTensor(tensor) for name, tensor in state.items()}


def read_hf_tensors(hf_dir: pathlib.Path) -> dict[str, TensorInfo | TorchTensor]:
    """Every tensor of an HF folder, by name, as a lazy handle with `shape`, `dtype` and `read()`."""
    tensors: dict[str, TensorInfo | TorchTensor] = {}
    for file in hf_weight_files(hf_dir):
        if file.suffix == ".bin":
            log.warning("%s: legacy PyTorch weights, read with torch.load(weights_only=True)", file.name)
            tensors.update(_read_torch_bin(file))
        else:
            tensors.update(read_safetensors_index(file))
    return tensors
