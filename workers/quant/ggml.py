"""llama.cpp's tensor types (``q4_k``, ``q8_0``, ...), quantized and dequantized by ggml itself.

Why not a re-implementation: the point of a ``gguf`` space is that the weights CoA-LoRA trains and is evaluated on
are the weights llama.cpp will compute with. ggml's K-quants choose their scales by an iterative search
(``make_qkx2_quants``, ``make_q3_quants``) whose every float operation matters for bit-identity, so the codes
come from the library that llama.cpp links: ``libggml-base`` as bundled by llama-cpp-python (the ``[gguf]`` extra),
through ``ctypes``. ``ggml_quantize_chunk`` is the function ``llama-quantize`` calls (without an importance
matrix); ``to_float`` from the type traits is the dequantizer the CPU backend uses. gguf-py's numpy quantizers are
the independent cross-check in the tests (they cover the legacy types; K-quants it only dequantizes).

A matrix in storage form is its ggml row data, rows of ``ggml_row_size(type, in_features)`` bytes, exactly what a
GGUF file holds for the tensor. ggml never pads a row, so a type applies only to matrices whose row length is a
multiple of its block (``QuantSetting.row_multiple``). Rows are independent, so both directions split the rows
over ``torch.get_num_threads()`` threads (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from search.space import GGUF_TYPES, QuantSetting

INSTALL_HINT = "install the gguf extra: pip install 'coalora[gguf]' (make test does), which builds llama-cpp-python"


class GGMLUnavailable(RuntimeError):
    """libggml (from llama-cpp-python) is not installed."""


class _TypeTraits(ctypes.Structure):
    _fields_ = [  # struct ggml_type_traits, ggml.h
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def library_dir() -> Path:
    """llama-cpp-python's ``lib/`` directory, which holds libggml-base and libllama."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise GGMLUnavailable(f"llama.cpp's ggml library is not installed: {INSTALL_HINT}")
    return Path(spec.origin).parent / "lib"


@lru_cache(maxsize=1)
def _lib() -> ctypes.CDLL:
    path = library_dir() / "libggml-base.so"
    if not path.is_file():
        raise GGMLUnavailable(f"{path} is missing from the llama-cpp-python install: {INSTALL_HINT}")
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    return lib


def available() -> bool:
    try:
        _lib()
    except (GGMLUnavailable, OSError):
        return False
    return True


def type_id(code: str) -> int:
    return GGUF_TYPES[code][0]


def row_size(code: str, n: int) -> int:
    """Bytes of one row of ``n`` weights in type ``code``, from ggml."""
    return int(_lib().ggml_row_size(type_id(code), n))


@lru_cache(maxsize=None)
def _to_float(code: str):
    traits = _lib().ggml_get_type_traits(type_id(code)).contents
    return _TO_FLOAT(traits.to_float)


@dataclass(frozen=True)
class GGMLWeight:
    """A matrix in a llama.cpp type: its GGUF row data (uint8, rows × row bytes) and torch shape (out, in)."""

    setting: QuantSetting
    shape: tuple[int, int]
    dtype: torch.dtype
    data: np.ndarray

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


def packed_nbytes(numel: int, setting: QuantSetting) -> int:
    """Bytes of a matrix of ``numel`` weights (rows a multiple of the block): numel / block · bytes per block."""
    _, weights, nbytes = GGUF_TYPES[setting.code]
    return -(-numel // weights) * nbytes


def check_shape(shape: tuple[int, ...], setting: QuantSetting, name: str) -> None:
    """ValueError unless ``shape`` is a matrix whose rows ggml can quantize in ``setting``'s type."""
    if len(shape) != 2:
        raise ValueError(f"{name}: llama.cpp types quantize 2-D matrices, got shape {tuple(shape)}")
    block = setting.row_multiple
    if shape[1] % block:
        raise ValueError(f"{name}: {setting.code} quantizes rows in blocks of {block} weights, but the matrix's rows "
                         f"hold {shape[1]}; choose a type with a block that divides {shape[1]}")


DECODE_SPLIT, ENCODE_SPLIT = 1 << 20, 1 << 16
"""Entries per thread below which rows stay on the calling thread: decoding runs at about 1-2 GB/s per thread, so
handing a small matrix to threads costs more than it saves; encoding (iq4_nl, K-quants search scales) is ~100x
slower per entry and splits early."""


def _row_chunks(rows: int, cols: int, per_thread: int) -> list[tuple[int, int]]:
    threads = max(1, min(torch.get_num_threads(), rows, -(-rows * cols // per_thread)))
    step = -(-rows // threads)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, torch.get_num_threads()), thread_name_prefix="ggml")


def _run(jobs: list[tuple[int, int]], fn) -> None:
    if len(jobs) == 1:
        fn(*jobs[0])
        return
    for future in [_pool().submit(fn, *job) for job in jobs]:
        future.result()


def quantize(weight: torch.Tensor, setting: QuantSetting, *, name: str = "matrix") -> GGMLWeight:
    """``weight`` (out, in) in ``setting``'s llama.cpp type, as ggml's ``llama-quantize`` would write it."""
    check_shape(tuple(weight.shape), setting, name)
    if not torch.isfinite(weight).all():
        raise ValueError(f"{name} with setting {setting}: the matrix holds NaN or Inf values")
    lib, kind = _lib(), type_id(setting.code)
    if lib.ggml_quantize_requires_imatrix(kind):
        raise ValueError(f"{setting.code} needs an importance matrix, which coalora does not compute")
    rows, cols = weight.shape
    src = np.ascontiguousarray(weight.detach().to("cpu", torch.float32).numpy())
    row_bytes = row_size(setting.code, cols)
    dst = np.empty((rows, row_bytes), dtype=np.uint8)
    lib.ggml_quantize_init(kind)  # once per type; ggml_quantize_chunk would otherwise race on it from threads

    def chunk(r0: int, r1: int) -> None:
        written = lib.ggml_quantize_chunk(kind, src.ctypes.data, dst.ctypes.data, r0 * cols, r1 - r0, cols, None)
        if written != (r1 - r0) * row_bytes:
            raise RuntimeError(f"ggml wrote {written} bytes for rows {r0}..{r1} of {name}, expected "
                               f"{(r1 - r0) * row_bytes}")

    _run(_row_chunks(rows, cols, ENCODE_SPLIT), chunk)
    return GGMLWeight(setting, (rows, cols), weight.dtype, dst)


def dequantize(packed: GGMLWeight, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 weights llama.cpp computes with, by ggml's own ``to_float``. ``out``: a contiguous float32 CPU
    buffer of at least ``numel`` entries, returned as a view of the matrix's shape (as blockwise.dequantize)."""
    rows, cols = packed.shape
    if out is None:
        result = torch.empty(packed.shape, dtype=torch.float32)
    elif out.dtype != torch.float32 or not out.is_contiguous() or out.device.type != "cpu" or out.numel() < rows * cols:
        raise ValueError(f"ggml dequantizes into a contiguous float32 CPU buffer of at least {rows * cols} entries")
    else:
        result = out.view(-1)[: rows * cols].view(rows, cols)
    to_float, data, dst = _to_float(packed.setting.code), packed.data, result.numpy()
    row_bytes = data.shape[1]

    def chunk(r0: int, r1: int) -> None:
        to_float(data.ctypes.data + r0 * row_bytes, dst.ctypes.data + r0 * cols * 4, (r1 - r0) * cols)

    _run(_row_chunks(rows, cols, DECODE_SPLIT), chunk)
    return result if packed.dtype == torch.float32 or out is not None else result.to(packed.dtype)


def fake_quantize(weight: torch.Tensor, setting: QuantSetting, *, name: str = "matrix") -> torch.Tensor:
    """dequantize(quantize(W)): the weights llama.cpp uses for ``weight`` in ``setting``'s type."""
    return dequantize(quantize(weight, setting, name=name)).to(weight.dtype)
