"""Golden pre-quantized checkpoints: small bitsandbytes 4-bit model directories as transformers saves them.

Writes complete checkpoint directories (config.json with transformers' `quantization_config`,
generation_config.json, model.safetensors in bitsandbytes' layout) from the tiny Llama that
scripts/golden/nf4.py quantizes, with the codes of nf4.py's independent numpy reference of
bitsandbytes' CUDA quantization, and records for each the values a reader must hold: every
weight's f32 values (a 4-bit weight dequantized, a float tensor converted), as the sha256 of its
little-endian f32 bytes. lathe's tests read the directories with formats/bnb4bit_checkpoint.ts and
kernels/models/load.ts and compare bit for bit. The test suite itself never runs Python.

Usage (from the repository root; Debian: apt install python3-numpy python3-torch, and run
/usr/bin/python3; the inputs are nf4.py's):

    deno run -A scripts/make_tiny_models.ts --out /tmp/nf4-in/f32 --arch llama --size nano --dtype f32
    deno run -A scripts/make_tiny_models.ts --out /tmp/nf4-in/bf16 --arch llama --size nano --dtype bf16
    python3 scripts/golden/nf4_checkpoints.py --f32 /tmp/nf4-in/f32/llama-nano \
        --bf16 /tmp/nf4-in/bf16/llama-nano --out tests/fixtures/golden/nf4/checkpoints

Checkpoints (`<out>/<name>/`), from the bf16 model or from the f32 model rounded to f16
(nearest even, as numpy's astype(float16)):

    nf4-dq       bf16  NF4, double quantization, llm_int8_skip_modules null (transformers' default)
    nf4          f16   NF4, absmax in f32, ["lm_head"]
    fp4-dq-skip  bf16  FP4, double quantization, llm_int8_skip_modules
                       ["lm_head", "model.layers.1.self_attn", "down_proj"]: layer 1's attention
                       and every down_proj stay bf16 (a path prefix and a module's own name)
    fp4          f16   FP4, absmax in f32, ["lm_head"]

(The tiny Llama ties its embeddings, so there is no lm_head tensor. Each directory is 120-170 KB,
most of it the 16-bit embedding table, which is why the skip list rides on one of the four.)

Layout per 4-bit weight W [out, in] (FORMATS.md; bitsandbytes' QuantState.as_dict(packed=True)):
W U8 [ceil(n/2), 1]; W.absmax U8 [nb] (double quantization) or F32 [nb]; W.quant_map F32 [16];
W.nested_absmax F32 [ceil(nb/256)] and W.nested_quant_map F32 [256] (double quantization);
W.quant_state.bitsandbytes__<type> U8, the JSON `json.dumps` writes. Everything else keeps its
dtype. Dequantize (bitsandbytes' kDequantizeBlockwise, in f32): absmax[b] =
nested_quant_map[code[b]] * nested_absmax[b // 256] + offset, then w[k] = quant_map[c_k] * absmax[k // 64].
The tokenizer is left out to keep the fixture small (the model's is data/demo/tokenizer).

Output: the directories and `golden.json` (the inputs' sha256, each checkpoint's settings, its
model.safetensors sha256, its 4-bit weights, and per tensor the sha256 of the f32 values).
"""

import argparse
import hashlib
import json
import os
import struct
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nf4 import FP4, NF4, dynamic_map_torch, quantize, sha256  # noqa: E402

F = np.float32
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

CHECKPOINTS = [
    # name, source, quant_type, double_quant, llm_int8_skip_modules
    ("nf4-dq", "bf16", "nf4", True, None),
    ("nf4", "f16", "nf4", False, ["lm_head"]),
    ("fp4-dq-skip", "bf16", "fp4", True, ["lm_head", "model.layers.1.self_attn", "down_proj"]),
    ("fp4", "f16", "fp4", False, ["lm_head"]),
]

TORCH_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


def read_raw(path):
    """name -> (dtype, shape, raw little-endian bytes), in header order."""
    with open(path, "rb") as fh:
        raw = fh.read()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + length])
    body = raw[8 + length:]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = (info["dtype"], list(info["shape"]), body[a:b])
    return out


def to_f32(dtype, data):
    if dtype == "F32":
        return np.frombuffer(data, dtype="<f4").astype(F)
    if dtype == "F16":
        return np.frombuffer(data, dtype="<f2").astype(F)
    if dtype == "BF16":
        return (np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16).view(F)
    raise ValueError(dtype)


def write_safetensors(path, tensors):
    """tensors: name -> (dtype, shape, bytes); names sorted, `{"format": "pt"}` metadata as transformers writes."""
    header = {"__metadata__": {"format": "pt"}}
    chunks, offset = [], 0
    for name in sorted(tensors):
        dtype, shape, data = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def is_skipped(module, skip):
    """transformers 4.x `_replace_with_bnb_linear`: own name listed, or `<entry>.` inside the path, or equal."""
    name = module.rsplit(".", 1)[-1]
    return any(s == name or (s + ".") in module or s == module for s in skip)


def dequantize(q, quant_type, shape, qmap):
    """bitsandbytes' dequantize_4bit in float32, from the stored parts."""
    n = int(np.prod(shape))
    table = NF4 if quant_type == "nf4" else FP4
    if "nested_absmax" in q:
        idx = np.arange(q["absmax"].size) // 256
        absmax = (qmap[q["absmax"]] * q["nested_absmax"][idx]).astype(F)
        absmax = (absmax + q["offset"][0]).astype(F)
    else:
        absmax = q["absmax"]
    codes = np.empty(2 * q["codes"].size, dtype=np.uint8)
    codes[0::2] = q["codes"] >> 4
    codes[1::2] = q["codes"] & 0xF
    k = np.arange(n)
    return (table[codes[:n]] * absmax[k // 64]).astype(F)


def f32_sha256(values):
    return hashlib.sha256(np.ascontiguousarray(values, dtype="<f4").tobytes()).hexdigest()


def checkpoint(out_dir, source, config, quant_type, dq, skip, qmap):
    """Writes one checkpoint directory; returns its golden record."""
    os.makedirs(out_dir, exist_ok=True)
    tensors, quantized, values = {}, [], {}
    for name, (dtype, shape, data) in source.items():
        module = name[: -len(".weight")] if name.endswith(".weight") else None
        proj = module is not None and module.rsplit(".", 1)[-1] in PROJECTIONS
        if not proj or is_skipped(module, skip if skip is not None else ["lm_head"]):
            tensors[name] = (dtype, shape, data)
            values[name] = f32_sha256(to_f32(dtype, data))
            continue
        w = to_f32(dtype, data).reshape(shape)
        q = quantize(w, quant_type, 64, dq, qmap)
        n = w.size
        tensors[name] = ("U8", [-(-n // 2), 1], q["codes"].tobytes())
        if dq:
            tensors[name + ".absmax"] = ("U8", [q["absmax"].size], q["absmax"].tobytes())
            tensors[name + ".nested_absmax"] = ("F32", [q["nested_absmax"].size], q["nested_absmax"].astype("<f4").tobytes())
            tensors[name + ".nested_quant_map"] = ("F32", [256], qmap.astype("<f4").tobytes())
        else:
            tensors[name + ".absmax"] = ("F32", [q["absmax"].size], q["absmax"].astype("<f4").tobytes())
        table = NF4 if quant_type == "nf4" else FP4
        tensors[name + ".quant_map"] = ("F32", [16], table.astype("<f4").tobytes())
        # QuantState.as_dict(packed=True): the non-tensor items, in its order, as json.dumps writes them.
        state = {"quant_type": quant_type, "blocksize": 64, "dtype": TORCH_DTYPES[dtype], "shape": shape}
        if dq:
            state.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": float(q["offset"][0])})
        packed = json.dumps(state).encode()
        tensors[f"{name}.quant_state.bitsandbytes__{quant_type}"] = ("U8", [len(packed)], packed)
        quantized.append(name)
        values[name] = f32_sha256(dequantize(q, quant_type, shape, qmap))
    write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    cfg = dict(config)
    cfg["torch_dtype"] = TORCH_DTYPES[next(iter(source.values()))[0]]
    # BitsAndBytesConfig.to_dict(), as transformers writes it into config.json (keys sorted).
    cfg["quantization_config"] = {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": "bfloat16",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": dq,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(cfg, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return {
        "quant_type": quant_type,
        "double_quant": dq,
        "llm_int8_skip_modules": skip,
        "model.safetensors": sha256(os.path.join(out_dir, "model.safetensors")),
        "quantized": sorted(quantized),
        "f32_sha256": dict(sorted(values.items())),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f32", required=True, help="tiny model directory, f32 weights")
    ap.add_argument("--bf16", required=True, help="the same tiny model, bf16 weights")
    ap.add_argument("--out", default="tests/fixtures/golden/nf4/checkpoints")
    args = ap.parse_args()
    qmap = dynamic_map_torch()
    bf16 = read_raw(os.path.join(args.bf16, "model.safetensors"))
    f32 = read_raw(os.path.join(args.f32, "model.safetensors"))
    f16 = {
        name: ("F16", shape, to_f32(dtype, data).astype("<f2").tobytes())
        for name, (dtype, shape, data) in f32.items()
    }
    with open(os.path.join(args.bf16, "config.json")) as fh:
        config = json.load(fh)
    with open(os.path.join(args.bf16, "generation_config.json")) as fh:
        generation = fh.read()
    sources = {"bf16": bf16, "f16": f16}
    records = {}
    for name, source, quant_type, dq, skip in CHECKPOINTS:
        out_dir = os.path.join(args.out, name)
        records[name] = {"source": source, **checkpoint(out_dir, sources[source], config, quant_type, dq, skip, qmap)}
        with open(os.path.join(out_dir, "generation_config.json"), "w") as fh:
            fh.write(generation)
    import torch

    meta = {
        "model": {"arch": "llama", "size": "nano", "seed": 0},
        "sha256": {
            "f32/model.safetensors": sha256(os.path.join(args.f32, "model.safetensors")),
            "bf16/model.safetensors": sha256(os.path.join(args.bf16, "model.safetensors")),
            "bf16/config.json": sha256(os.path.join(args.bf16, "config.json")),
        },
        "numpy": np.__version__,
        "torch": torch.__version__,
        "checkpoints": records,
    }
    with open(os.path.join(args.out, "golden.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    main()
