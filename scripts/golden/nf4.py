"""Golden bitsandbytes 4-bit codes: an independent reference of bitsandbytes' CUDA quantization.

Reimplements, in numpy float32, what `bitsandbytes.functional.quantize_4bit` does on CUDA
(csrc/kernels.cu `kQuantizeBlockwise` / `kQuantizeBlockwiseSmall`, `dQuantizeNF4`,
`dQuantizeFP4`, `dQuantize`; functional.py `create_dynamic_map`, the double-quantization
offset), and writes the codes for lathe's tests, which compare formats/bnb4bit.ts against them
code for code. The test suite itself never runs Python: it reads the committed output.

Usage (from the repository root; Debian: apt install python3-numpy python3-torch, and run
/usr/bin/python3):

    deno run -A scripts/make_tiny_models.ts --out /tmp/nf4-in/f32 --arch llama --size nano --dtype f32
    deno run -A scripts/make_tiny_models.ts --out /tmp/nf4-in/bf16 --arch llama --size nano --dtype bf16
    python3 scripts/golden/nf4.py --f32 /tmp/nf4-in/f32/llama-nano --bf16 /tmp/nf4-in/bf16/llama-nano \
        --edge tests/fixtures/golden/nf4/edge.safetensors --out tests/fixtures/golden/nf4

Inputs, per case: the seven projection weights of each layer of the tiny Llama (f32; f16 = the
f32 weights rounded to nearest even; bf16 = the bf16 checkpoint), and `edge.safetensors`
(hand-made values: an all-zero block, values on every NF4 threshold, ±0, ties, a ragged
length). Output: `<dtype>.safetensors` with, per weight and per double-quantization setting,
the packed codes, the absmax (f32, or 8-bit codes with the nested absmax), and the offset;
`maps.safetensors` with the NF4, FP4 and dynamic maps; `golden.json` with the inputs' sha256.

Choices where bitsandbytes leaves room, which formats/bnb4bit.ts makes the same way:
- 1/absmax is the IEEE f32 quotient. bitsandbytes builds with --use_fast_math (rcp.approx,
  within 1 ulp), so on CUDA a value within about an ulp of a decision threshold can take the
  neighbouring code.
- offset = mean(absmax) summed in float64 and rounded to float32 (torch's CUDA mean sums in
  float32 in its own order).
"""

import argparse
import hashlib
import json
import os
import struct

import numpy as np

F = np.float32

NF4_THRESHOLDS = [F(v) for v in [
    0.03979014977812767, 0.3893125355243683, 0.6427869200706482, 0.8614784181118011,
    0.5016634166240692, 0.2035212516784668, 0.2920137718319893, 0.1202552504837513,
    -0.33967943489551544, -0.13791173323988914, -0.045525018125772476, -0.23460740596055984,
    -0.6106329262256622, -0.4599952697753906, -0.8480964004993439,
]]

NF4 = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=F)

FP4_MAG = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
FP4 = np.array([m / 12.0 for m in FP4_MAG] + [-m / 12.0 for m in FP4_MAG], dtype=F)
FP4_THRESHOLDS = [F(v) for v in [0.29166667, 0.583333, 0.8333333, 0.4166667, 0.0859375, 0.20833333, 0.00260417]]


def nf4_code(x):
    """dQuantizeNF4, vectorised: the kernel's tree of strict > tests (NaN fails all: code 0)."""
    t = NF4_THRESHOLDS
    # The tree picks the number of thresholds x exceeds among the sorted midpoints.
    mids = sorted(t)
    code = np.zeros(x.shape, dtype=np.uint8)
    for m in mids:
        code += (x > m).astype(np.uint8)
    return code


def fp4_code(x):
    """dQuantizeFP4: sign bit for x < 0, then the magnitude's tree."""
    t = FP4_THRESHOLDS
    a = np.abs(x)
    sign = np.where(x < 0, 8, 0).astype(np.uint8)
    mag = np.where(
        a > t[0],
        np.where(a > t[1], np.where(a > t[2], 3, 2), np.where(a > t[3], 5, 4)),
        np.where(a > t[4], np.where(a > t[5], 7, 6), np.where(a > t[6], 1, 0)),
    ).astype(np.uint8)
    return mag + sign


def linspace_f32(start, end, steps):
    """torch.linspace(start, end, steps, dtype=float32) on the CPU (float32 step, symmetric halves)."""
    s, e = F(start), F(end)
    step = F(F(e - s) / F(steps - 1))
    half = steps // 2
    out = []
    for i in range(steps):
        out.append(F(s + F(step * F(i))) if i < half else F(e - F(step * F(steps - i - 1))))
    return out


def dynamic_map():
    """create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) in float32."""
    data = []
    for i in range(7):
        b = linspace_f32(0.1, 1.0, 2 ** i + 1)
        means = [F(F(b[j] + b[j + 1]) / F(2.0)) for j in range(len(b) - 1)]
        scale = F(10.0 ** (-6 + i))
        data += [float(F(scale * m)) for m in means]
        data += [float(F(-scale * m)) for m in means]
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    data.sort()
    return np.array(data, dtype=F)


def dynamic_map_torch():
    """create_dynamic_map as bitsandbytes writes it, with torch (a cross-check of dynamic_map)."""
    import torch

    data = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(7 - 1) + i)) * means).tolist()
        data += (-(10 ** (-(7 - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32).numpy()


def dynamic_code(qmap, x):
    """dQuantize<0>: binary search over the sorted map, then the nearer neighbour by f32 midpoint."""
    pivot, upper_pivot, lower_pivot = 127, 255, 0
    lower, upper = F(-1.0), F(1.0)
    val = qmap[pivot]
    i = 64
    while i > 0:
        if x > val:
            lower_pivot, lower = pivot, val
            pivot += i
        else:
            upper_pivot, upper = pivot, val
            pivot -= i
        val = qmap[pivot]
        i >>= 1
    if upper_pivot == 255:
        upper = qmap[upper_pivot]
    if lower_pivot == 0:
        lower = qmap[lower_pivot]
    if x > val:
        return upper_pivot if x > F(F(upper + val) * F(0.5)) else pivot
    return lower_pivot if x < F(F(lower + val) * F(0.5)) else pivot


def quantize(w, quant_type, blocksize, double_quant, qmap):
    """quantize_4bit on CUDA: packed codes, absmax (or its codes), nested absmax, offset."""
    n = w.size
    flat = w.reshape(-1).astype(F)
    nb = -(-n // blocksize)
    padded = np.zeros(nb * blocksize, dtype=F)
    padded[:n] = flat
    blocks = padded.reshape(nb, blocksize)
    absmax = np.abs(blocks).max(axis=1).astype(F)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (F(1.0) / absmax).astype(F)
        x = (blocks * inv[:, None]).astype(F).reshape(-1)
    code = nf4_code(x) if quant_type == "nf4" else fp4_code(x)
    nbytes = -(-n // 2)
    codes = ((code[0:2 * nbytes:2] << 4) | code[1:2 * nbytes:2]).astype(np.uint8)
    out = {"codes": codes}
    if not double_quant:
        out["absmax"] = absmax
        return out
    offset = F(np.sum(absmax.astype(np.float64)) / nb)
    centred = (absmax - offset).astype(F)
    nn = -(-nb // 256)
    nested = np.zeros(nn, dtype=F)
    acodes = np.zeros(nb, dtype=np.uint8)
    for j in range(nn):
        c = centred[j * 256:(j + 1) * 256]
        m = F(np.abs(c).max())
        nested[j] = m
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_m = F(F(1.0) / m)
        for k, v in enumerate(c):
            acodes[j * 256 + k] = dynamic_code(qmap, F(v * inv_m))
    out["absmax"] = acodes
    out["nested_absmax"] = nested
    out["offset"] = np.array([offset], dtype=F)
    return out


# --- safetensors, read and written by hand (numpy has no bfloat16) ---

def read_safetensors(path):
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
        chunk = body[a:b]
        if info["dtype"] == "F32":
            arr = np.frombuffer(chunk, dtype="<f4")
        elif info["dtype"] == "F16":
            arr = np.frombuffer(chunk, dtype="<f2").astype(F)
        elif info["dtype"] == "BF16":
            arr = (np.frombuffer(chunk, dtype="<u2").astype(np.uint32) << 16).view(F)
        else:
            raise ValueError(f"{path}: {name} has dtype {info['dtype']}")
        out[name] = arr.reshape(info["shape"]).astype(F)
    return out


def write_safetensors(path, tensors):
    dtypes = {np.dtype(np.uint8): "U8", np.dtype(F): "F32"}
    header, chunks, offset = {}, [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        data = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtypes[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text + b"".join(chunks))


def sha256(path):
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--f32", required=True, help="tiny model directory, f32 weights")
    ap.add_argument("--bf16", required=True, help="the same tiny model, bf16 weights")
    ap.add_argument("--edge", required=True, help="edge.safetensors (hand-made values)")
    ap.add_argument("--out", default="tests/fixtures/golden/nf4")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    # The map is what torch computes: its vectorised linspace rounds 44 entries differently
    # from a plain float32 loop (dynamic_map() below), so torch is required for it.
    qmap = dynamic_map_torch()
    plain = dynamic_map()
    print(f"dynamic map: {int(np.sum(qmap.view(np.uint32) != plain.view(np.uint32)))} of 256 entries differ "
          "from a plain float32 linspace in the last bit")
    f32 = read_safetensors(os.path.join(args.f32, "model.safetensors"))
    bf16 = read_safetensors(os.path.join(args.bf16, "model.safetensors"))
    edge = read_safetensors(args.edge)
    proj = lambda ts: {k: v for k, v in ts.items() if k.rsplit(".", 2)[-2] in PROJECTIONS}
    inputs = {
        "f32": {**proj(f32), **edge},
        "f16": {k: v.astype(np.float16).astype(F) for k, v in {**proj(f32), **edge}.items()},
        "bf16": {**proj(bf16), **edge},
    }
    for dtype, weights in inputs.items():
        out = {}
        for name, w in weights.items():
            for quant_type in ("nf4", "fp4"):
                for dq in (True, False):
                    got = quantize(w, quant_type, 64, dq, qmap)
                    for key, value in got.items():
                        out[f"{name}.{quant_type}.{'dq' if dq else 'plain'}.{key}"] = value
        write_safetensors(os.path.join(args.out, f"{dtype}.safetensors"), out)
    write_safetensors(os.path.join(args.out, "maps.safetensors"), {"nf4": NF4, "fp4": FP4, "dynamic": qmap})
    import torch

    meta = {
        "model": {"arch": "llama", "size": "nano", "seed": 0},
        "sha256": {
            "f32/model.safetensors": sha256(os.path.join(args.f32, "model.safetensors")),
            "bf16/model.safetensors": sha256(os.path.join(args.bf16, "model.safetensors")),
            "edge.safetensors": sha256(args.edge),
        },
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    with open(os.path.join(args.out, "golden.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    main()
