"""SmolLM2-135M widened so that llama.cpp's K-quants fit every matrix: the same function, rows of 768 and 1536.

    python bench/widen.py --out runs/smollm2-w768.gguf [--layers 30]

The K-quants quantize rows in 256-weight super-blocks, and SmolLM2's hidden size (576) is not a multiple of 256, so
on the packaged model they fit only the MLP down projections (docs/deploy.md). This writes a GGUF whose hidden size
is zero-padded to 768 and which computes the same next-token distribution (up to RMSNorm's epsilon):

- the token embedding gains 192 zero columns, so the residual stream's new coordinates start at 0;
- every matrix reading the residual stream (q, k, v, gate, up) gains zero input columns; every matrix writing it
  (o, down) gains zero output rows, so those coordinates stay 0 through the network;
- one zero attention head follows every 3 real ones (12 query heads for 3 key/value heads keeps each real head on
  its own key/value head); the output projection gains the matching zero input columns;
- the RMSNorm weights are scaled by sqrt(576/768), since the mean square now runs over 768 coordinates of which 192
  are 0 (the epsilon is, in effect, divided by 0.75).

Target matrices are stored in F32 (the packaged Q4_1 file's values: coalora's "full precision" for this model),
the embedding in Q8_0 as packaged. Bit-widths counted on this model include the zero padding, so they compare
files of this model with each other, not with the packaged one. ``layers`` keeps the first blocks only (a smaller
model for tests; it is no longer the same function).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WIDTH = 768


def widen(out: Path, layers: int | None = None) -> Path:
    """Write the widened SmolLM2 GGUF to ``out`` (atomically) and return it."""
    import gguf

    from workers.export.gguf import _metadata, _write, base_file
    from workers.models import resolve_model

    reader = gguf.GGUFReader(base_file(resolve_model("smollm2")))
    field = lambda key: int(reader.fields[f"llama.{key}"].contents())  # noqa: E731
    hidden, heads, kv_heads, blocks = (field("embedding_length"), field("attention.head_count"),
                                       field("attention.head_count_kv"), field("block_count"))
    head_dim, group = hidden // heads, heads // kv_heads
    new_heads = WIDTH // head_dim
    if new_heads % kv_heads or new_heads // kv_heads <= group:
        raise ValueError(f"cannot widen {hidden} to {WIDTH} by whole heads per key/value head")
    layers = blocks if layers is None else min(int(layers), blocks)
    per_group = new_heads // kv_heads
    # position of each real head among the widened ones: group g's heads first, its zero heads after
    slots = np.array([(h // group) * per_group + h % group for h in range(heads)])
    norm_scale = np.float32(np.sqrt(hidden / WIDTH))

    def widen_heads(rows: np.ndarray) -> np.ndarray:
        """(heads·head_dim, …) → (new_heads·head_dim, …) with zero heads in the new slots."""
        out = np.zeros((new_heads, head_dim) + rows.shape[1:], dtype=np.float32)
        out[slots] = rows.reshape((heads, head_dim) + rows.shape[1:])
        return out.reshape((new_heads * head_dim,) + rows.shape[1:])

    def pad(array: np.ndarray, rows: int | None = None, cols: int | None = None) -> np.ndarray:
        rows, cols = rows or array.shape[0], cols or array.shape[1]
        out = np.zeros((rows, cols), dtype=np.float32)
        out[: array.shape[0], : array.shape[1]] = array
        return out

    writer = gguf.GGUFWriter(None, "llama")
    _metadata(reader, writer, skip={"general.file_type", "general.name", "llama.embedding_length",
                                    "llama.attention.head_count", "llama.block_count"})
    writer.add_name(f"SmolLM2-135M-Instruct widened to {WIDTH} ({layers} blocks)")
    writer.add_embedding_length(WIDTH)
    writer.add_head_count(new_heads)
    writer.add_block_count(layers)
    for tensor in reader.tensors:
        name = tensor.name
        if name.startswith("blk.") and int(name.split(".")[1]) >= layers:
            continue
        w = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)  # numpy order: (out, in)
        kind = name.split(".")[-2] if name.startswith("blk.") else name.split(".")[0]
        if w.ndim == 1:  # norms
            w = np.concatenate([w * norm_scale, np.zeros(WIDTH - hidden, dtype=np.float32)])
        elif kind == "token_embd":
            w = pad(w, cols=WIDTH)
            writer.add_tensor(name, gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            continue
        elif kind == "attn_q":  # rows grouped by head (llama.cpp's per-head order stays within a head)
            w = pad(widen_heads(w), cols=WIDTH)
        elif kind == "attn_output":
            w = pad(widen_heads(w.T).T, rows=WIDTH)
        elif kind in ("attn_k", "attn_v", "ffn_gate", "ffn_up"):
            w = pad(w, cols=WIDTH)
        elif kind == "ffn_down":
            w = pad(w, rows=WIDTH)
        else:
            raise ValueError(f"unexpected tensor {name} in the packaged SmolLM2")
        writer.add_tensor(name, np.ascontiguousarray(w))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _write(writer, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--layers", type=int, default=None, help="keep the first N blocks (default: all 30)")
    args = parser.parse_args()
    out = widen(args.out, args.layers)
    print(json.dumps({"bench": "widen", "file": str(out), "mb": round(out.stat().st_size / 2**20, 1),
                      "width": WIDTH, "layers": args.layers}))


if __name__ == "__main__":
    main()
