#!/usr/bin/env python3
"""The PyTorch reference of the QLoRA/LoRA training benchmark (bench/nf4.ts, bench/gpu.sh).

A LoRA training step with transformers + peft on a random-weight model of the same shape as
lathe's (Mistral 7B's config.json by default, `--layers` to keep fewer layers), run the way such
a fine-tune is usually run: bf16 weights, SDPA attention, gradient checkpointing (non-reentrant),
LoRA r 16, alpha 2r, dropout 0.05 on all seven projections (fp32 adapter weights, peft's
default), AdamW (lr 1e-4, PyTorch semantics) with the gradient norm clipped at 1. The micro-batch
is one causal document per row of random tokens, as lathe's shape runs (`--docs 1`). The
machines this runs on have no bitsandbytes, so the reference is LoRA on the 16-bit base; lathe's
QLoRA and LoRA steps are both compared with it (`--lathe nf4.json`).

A step is timed from the forward to the loss's readback after the optimizer step, after
`--warmup` untimed steps; peak memory is `torch.cuda.max_memory_allocated()` over the timed
steps. FLOPs per step use lathe's model (bench/train_flops.ts, one causal row per document):
layers fwd = L·(2·P·T + 2·R·T + 4·H·hd·A), bwd = L·(2·P·T + 4·R·T + 8·H·hd·A), head 2·V·D·T each
way, the layers' forward twice with checkpointing; P = frozen projection weights of a layer,
R = r·Σ(K + N) of its adapters, A = rows·S(S+1)/2.

    python3 bench/peft_lora.py [--layers 32] [--rows 1 --seq 2048] [--steps 5 --warmup 1]
                               [--rank 16] [--dtype bf16] [--device cuda] [--peak 989.4]
                               [--json peft_lora.json] [--lathe nf4.json]
    python3 bench/peft_lora.py --self-test --device cpu --seq 16 --steps 1   # no transformers needed

`--self-test` runs the same timing, FLOP and report code on a tiny plain-PyTorch stand-in model
(embedding, LoRA-adapted linear layers, head) so that the script is checked where transformers
and peft are missing. Without them (and without --self-test) it says so and exits with 3.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from datetime import datetime, timezone

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Mistral-7B-v0.3's config.json (bench/train_checkpoint.ts SHAPES["mistral-7b"]).
MISTRAL_7B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-5,
    max_position_embeddings=32768,
    sliding_window=None,
    tie_word_embeddings=False,
)

# Dense bf16 tensor-core peaks (NVIDIA data sheets), by adapter name.
KNOWN_PEAKS = [("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0)]

SKIPPED = 3


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=MISTRAL_7B["hidden_size"])
    p.add_argument("--intermediate", type=int, default=MISTRAL_7B["intermediate_size"])
    p.add_argument("--layers", type=int, default=MISTRAL_7B["num_hidden_layers"])
    p.add_argument("--heads", type=int, default=MISTRAL_7B["num_attention_heads"])
    p.add_argument("--kv-heads", type=int, default=MISTRAL_7B["num_key_value_heads"])
    p.add_argument("--vocab", type=int, default=MISTRAL_7B["vocab_size"])
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--dtype", choices=["bf16", "f16", "f32"], default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--peak", type=float, default=None, help="peak TFLOP/s (default: known bf16 tensor-core peak)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures to this file")
    p.add_argument("--lathe", default=None, help="lathe's nf4 benchmark JSON: print its ratios to this run")
    p.add_argument("--self-test", action="store_true", help="a plain-PyTorch stand-in model (no transformers)")
    args = p.parse_args(argv)
    for name in ["hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "rows", "seq", "steps", "rank"]:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if args.hidden % args.heads != 0 or args.heads % args.kv_heads != 0:
        p.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    return args


def training_flops(a: argparse.Namespace) -> dict[str, float]:
    """lathe's FLOP model (bench/train_flops.ts) for one causal document per row."""
    D, F, L, V, r = a.hidden, a.intermediate, a.layers, a.vocab, a.rank
    hd = D // a.heads
    kv = a.kv_heads * hd
    shapes = [(D, D), (kv, D), (kv, D), (D, D), (F, D), (F, D), (D, F)]  # (N out, K in) per projection
    P = sum(n * k for n, k in shapes)
    R = sum(r * (n + k) for n, k in shapes)
    T = a.rows * a.seq
    A = a.rows * a.seq * (a.seq + 1) / 2
    attn = a.heads * hd
    fwd = L * (2 * P * T + 2 * R * T + 4 * attn * A)
    bwd = L * (2 * P * T + 4 * R * T + 8 * attn * A)
    head = 2 * V * D * T
    recompute = 0 if a.no_checkpointing else fwd
    total = fwd + head + bwd + head + recompute
    return {"total": total, "model": total - recompute}


def known_peak(name: str) -> float | None:
    for key, peak in KNOWN_PEAKS:
        if key in name:
            return peak
    return None


def build_model(a: argparse.Namespace, torch, dtype):
    """transformers' Mistral with peft LoRA, or None when they are not installed."""
    try:
        import transformers
        import peft
    except ImportError as error:
        return None, f"{error.name} is not installed"
    config = transformers.MistralConfig(
        **{
            **MISTRAL_7B,
            "hidden_size": a.hidden,
            "intermediate_size": a.intermediate,
            "num_hidden_layers": a.layers,
            "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads,
            "vocab_size": a.vocab,
        },
        use_cache=False,
    )
    device = torch.device(a.device)

    def make():
        try:
            return transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
        except TypeError:  # transformers versions that renamed torch_dtype
            return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")

    if hasattr(device, "__enter__"):
        # Random init on the device: initialising 7·10⁹ weights on the host would take minutes.
        with device:
            model = make()
    else:
        model = make().to(device)
    if not a.no_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = peft.LoraConfig(
        r=a.rank,
        lora_alpha=2 * a.rank,
        lora_dropout=a.dropout,
        target_modules=PROJECTIONS,
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    versions = {"transformers": transformers.__version__, "peft": peft.__version__}
    return (model, versions), None


def build_stand_in(a: argparse.Namespace, torch, dtype):
    """A tiny plain-PyTorch model with LoRA-adapted linear layers (for --self-test)."""
    nn = torch.nn

    class LoraLinear(nn.Module):
        def __init__(self, k: int, n: int):
            super().__init__()
            self.base = nn.Linear(k, n, bias=False, dtype=dtype)
            self.base.weight.requires_grad_(False)
            self.lora_A = nn.Parameter(torch.randn(a.rank, k) / math.sqrt(k))
            self.lora_B = nn.Parameter(torch.zeros(n, a.rank))
            self.drop = nn.Dropout(a.dropout)
            self.scaling = 2.0

        def forward(self, x):
            xa = self.drop(x).float() @ self.lora_A.t()
            return self.base(x) + (xa @ self.lora_B.t() * self.scaling).to(x.dtype)

    class StandIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(a.vocab, a.hidden, dtype=dtype)
            self.embed.weight.requires_grad_(False)
            self.layers = nn.ModuleList(LoraLinear(a.hidden, a.hidden) for _ in range(a.layers))
            self.head = nn.Linear(a.hidden, a.vocab, bias=False, dtype=dtype)
            self.head.weight.requires_grad_(False)

        def forward(self, input_ids, labels):
            h = self.embed(input_ids)
            for layer in self.layers:
                h = h + torch.tanh(layer(h))
            logits = self.head(h).float()
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, a.vocab), labels[:, 1:].reshape(-1)
            )
            return type("Output", (), {"loss": loss})

    return StandIn().to(a.device), {"stand_in": "plain PyTorch (--self-test)"}


def run(a: argparse.Namespace) -> dict | None:
    import torch

    torch.manual_seed(a.seed)
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}[a.dtype]
    if a.self_test:
        model, versions = build_stand_in(a, torch, dtype)
    else:
        built, why = build_model(a, torch, dtype)
        if built is None:
            print(f"peft_lora: skipped: {why} (pip install transformers peft; or --self-test)", file=sys.stderr)
            return None
        model, versions = built
    model.train()
    cuda = torch.device(a.device).type == "cuda"
    device_name = torch.cuda.get_device_name(torch.device(a.device)) if cuda else platform.processor() or "cpu"
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=cuda)
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(a.seed)
    batches = [torch.randint(0, a.vocab, (a.rows, a.seq), generator=g).to(a.device) for _ in range(2)]

    def step(i: int) -> tuple[float, float]:
        ids = batches[i % 2]
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the device, as lathe's step waits for its gradient norm
        return time.perf_counter() - t0, value

    for i in range(a.warmup):
        step(i)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = [], []
    for i in range(a.warmup, a.warmup + a.steps):
        dt, loss = step(i)
        seconds.append(dt)
        losses.append(loss)
        print(f"  step {i + 1}: {dt:.3f} s, loss {loss:.3f}", file=sys.stderr)
    mean = sum(seconds) / len(seconds)
    flops = training_flops(a)
    peak = a.peak if a.peak is not None else known_peak(device_name) if cuda else None
    tflops = flops["total"] / mean / 1e12
    report = {
        "benchmark": "peft_lora",
        "date": datetime.now(timezone.utc).isoformat(),
        "device": device_name,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, **versions},
        "config": {k: v for k, v in vars(a).items() if k not in ("json", "lathe")},
        "tokensPerStep": a.rows * a.seq,
        "stepSeconds": {"mean": mean, "min": min(seconds), "max": max(seconds), "all": seconds},
        "tokensPerSecond": a.rows * a.seq / mean,
        "flopsPerStep": flops,
        "tflops": {"total": tflops, "model": flops["model"] / mean / 1e12},
        "peakTflops": peak,
        "peakFraction": None if peak is None else tflops / peak,
        "memory": {
            "peakBytes": torch.cuda.max_memory_allocated() if cuda else None,
            "reservedBytes": torch.cuda.max_memory_reserved() if cuda else None,
        },
        "loss": {"first": losses[0], "last": losses[-1]},
    }
    return report


def print_report(r: dict) -> None:
    c = r["config"]
    mem = r["memory"]["peakBytes"]
    print(
        f"peft LoRA on {r['device']} ({', '.join(f'{k} {v}' for k, v in r['versions'].items())}): "
        f"D {c['hidden']}, F {c['intermediate']}, {c['layers']} layers, V {c['vocab']}, {c['dtype']}, "
        f"r {c['rank']}, checkpointing {'off' if c['no_checkpointing'] else 'on'}, B×S {c['rows']}×{c['seq']}"
    )
    s = r["stepSeconds"]
    print(
        f"  step        {s['mean']:.3f} s mean (min {s['min']:.3f}, max {s['max']:.3f}) over {len(s['all'])} steps; "
        f"{r['tokensPerSecond']:.0f} tokens/s"
    )
    peak = "" if r["peakTflops"] is None else f", {100 * r['peakFraction']:.1f}% of {r['peakTflops']} TFLOP/s"
    print(
        f"  FLOPs/step  {r['flopsPerStep']['total']:.3e}: {r['tflops']['total']:.3g} TFLOP/s achieved "
        f"(model {r['tflops']['model']:.3g}){peak}"
    )
    if mem is not None:
        print(f"  GPU memory  peak {mem} B allocated ({mem / 2**30:.2f} GiB), {r['memory']['reservedBytes']} B reserved")
    print(f"  loss        {r['loss']['first']:.3f} -> {r['loss']['last']:.3f}")


def compare(r: dict, path: str) -> None:
    """lathe's LoRA and QLoRA steps (bench/nf4.ts --json) against this run."""
    with open(path) as f:
        lathe = json.load(f)
    train = lathe.get("train")
    if not train:
        print(f"\n{path} has no train part: nothing to compare")
        return
    tokens = r["tokensPerSecond"]
    mem = r["memory"]["peakBytes"]
    print(f"\nlathe ({lathe['device']['description']}) against peft LoRA ({r['device']}):")
    for key in ["lora", "qlora"]:
        t = train[key]
        line = f"  {t['model']}: {t['tokensPerSecond']:.0f} tokens/s = {t['tokensPerSecond'] / tokens:.2f}x"
        if mem:
            line += f"; peak memory {t['memory']['peakBytes'] / 2**30:.2f} GiB = {t['memory']['peakBytes'] / mem:.2f}x"
        print(line)
    if train["lora"]["tokensPerStep"] != r["tokensPerStep"]:
        print(f"  (tokens per step differ: lathe {train['lora']['tokensPerStep']}, peft {r['tokensPerStep']})")


def main(argv: list[str]) -> int:
    a = parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("peft_lora: skipped: torch is not installed", file=sys.stderr)
        return SKIPPED
    report = run(a)
    if report is None:
        return SKIPPED
    print_report(report)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"written: {a.json}")
    if a.lathe:
        compare(report, a.lathe)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
