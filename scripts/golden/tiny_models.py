"""Golden tensors for lathe's training math, from PyTorch + transformers + peft.

An independent second reference for kernels/reference/decoder.ts (and the WebGPU graph):
for each case it runs a tiny checkpoint written by lathe's own generator
(scripts/make_tiny_models.ts) through transformers' eager implementation with a peft LoRA
adapter on all seven projections, and records the batch, the loss, the logits and the
gradient of the loss with respect to every lora_A / lora_B.

Usage (from the repository root; needs deno on PATH and a throwaway Python environment, e.g.
`python3 -m venv /tmp/venv-model && /tmp/venv-model/bin/pip install torch transformers peft
safetensors numpy`; each case records the versions it was made with). The test suite itself
never runs Python: it reads the committed output.

    /tmp/venv-model/bin/python scripts/golden/tiny_models.py [--out tests/fixtures/golden/models]

The output is byte-for-byte reproducible for fixed library versions.

Written under --out:

    adapters/<arch>-nano/adapter_config.json        PeftModel.save_pretrained output (one per arch)
    adapters/<arch>-nano/adapter_model.safetensors
    <case>.json                                     batch, loss, model identity (see below)
    <case>.safetensors                              logits[B,S,V] and one gradient per LoRA matrix

The checkpoints themselves are not written: lathe's generator is deterministic, so each
case records (arch, size, seed) and the sha256 of model.safetensors and config.json, and
the test regenerates and checks them.

Conventions (B = rows, S = tokens per row, V = vocab):
- labels[b, t] are transformers' labels (unshifted; -100 = no loss), as passed to
  `model(..., labels=labels)`.
- targets[b, t] = labels[b, t + 1] for t < S - 1 and targets[b, S - 1] = -100: the token
  that position t predicts, which is lathe's Batch.targets and transformers'
  ForCausalLMLoss shift (labels padded with one -100, then shifted left by one).
- loss = sum over targets != -100 of -log softmax(logits[b, t])[targets[b, t]] / N,
  N = number of targets != -100 (transformers' mean, num_items_in_batch not given).
- docs[b, t] = index of the packed document within its row (0 when not packed); packed
  documents restart position_ids at 0, and the label of each document's first token is
  -100 (as DataCollatorWithFlattening writes), so no target crosses a document boundary.
- Gradients are d loss / d lora_{A,B}, keyed by the adapter's safetensors names
  (base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.lora_{A,B}.weight).

Training semantics: model.eval() (no dropout; attention and LoRA dropout are 0 anyway) and
use_cache=False (with a cache transformers skips its packed-sequence detection). A packed case
passes either a 4D additive mask built here (0 where key j <= query i in the same document and,
for mistral, i - j < sliding_window; finfo.min elsewhere) or no mask at all, letting transformers
find the documents from position_ids; the script checks that both give the same logits.
The adapter is peft's save_pretrained output with two fields made stable afterwards:
base_model_name_or_path ("lathe-tiny/<arch>-nano" instead of the temp dir) and the order of
target_modules (sorted; peft keeps a set).

Every case is also run in float64 (the same f32 weights, upcast): the largest f32 - f64
differences are stored under "f32_error" and bound what a correct f64 implementation
(kernels/reference/decoder.ts computes in f64) can differ from these f32 goldens.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import peft
import safetensors
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[2]
SIZE = "nano"
MODEL_SEED = 0
TOKENIZER = "data/demo/tokenizer"
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
# Seeds of the adapter values and of the token ids.
ADAPTER_SEED = {"llama": 11, "mistral": 12, "qwen2": 13}
IGNORE = -100

# rows: document lengths per row; prompt: leading tokens of each document without loss;
# native_packing: no attention_mask, transformers finds the documents from position_ids
CASES = [
    {
        "name": "llama_single",
        "arch": "llama",
        "description": "one row, one document, every token trained (tied embeddings, llama3 RoPE scaling)",
        "rows": [[16]],
        "prompt": 0,
    },
    {
        "name": "llama_packed",
        "arch": "llama",
        "description": "one row packing two documents (10 + 14 tokens): position_ids restart at 0 and a "
        "4D block-diagonal causal float mask keeps attention within each document",
        "rows": [[10, 14]],
        "prompt": 0,
    },
    {
        "name": "mistral_window",
        "arch": "mistral",
        "description": "S = 48 > sliding_window = 32: transformers' own sliding-window causal mask (eager)",
        "rows": [[48]],
        "prompt": 0,
    },
    {
        "name": "qwen2_bias",
        "arch": "qwen2",
        "description": "two rows of one document each, q/k/v biases, untied lm_head",
        "rows": [[12], [12]],
        "prompt": 0,
    },
    {
        "name": "qwen2_prompt_masked",
        "arch": "qwen2",
        "description": "labels -100 on a 7-token prompt prefix: only the completion is trained",
        "rows": [[20]],
        "prompt": 7,
    },
    {
        "name": "mistral_packed_window",
        "arch": "mistral",
        "description": "one row packing 40 + 16 tokens with sliding_window = 32: window and document masks "
        "together, from transformers' own packed-sequence detection (position_ids restart, "
        "no attention_mask)",
        "rows": [[40, 16]],
        "prompt": 0,
        "native_packing": True,
    },
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_checkpoints(root: Path) -> None:
    """Writes <root>/<arch>-nano with lathe's generator."""
    subprocess.run(
        [
            "deno",
            "run",
            "-A",
            "scripts/make_tiny_models.ts",
            "--out",
            str(root),
            "--arch",
            ",".join(sorted(ADAPTER_SEED)),
            "--size",
            SIZE,
            "--seed",
            str(MODEL_SEED),
            "--dtype",
            "f32",
            "--tokenizer",
            TOKENIZER,
        ],
        cwd=REPO,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def identity(model_dir: Path) -> dict[str, str]:
    return {name: sha256(model_dir / name) for name in ("model.safetensors", "config.json")}


def load_model(model_dir: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        raise SystemExit(f"transformers did not load {model_dir} cleanly: {bad}")
    model.eval()  # no dropout anywhere (attention_dropout and lora_dropout are 0 anyway)
    return model


def attach_lora(model: torch.nn.Module, arch: str) -> torch.nn.Module:
    """peft LoRA on all seven projections, with seeded random A and non-zero B."""
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        lora_dropout=LORA["lora_dropout"],
        target_modules=PROJECTIONS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(ADAPTER_SEED[arch])
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if ".lora_A." in name:
                # PEFT's own init range for A: U(-1/sqrt(in), 1/sqrt(in))
                bound = 1 / math.sqrt(param.shape[1])
                param.copy_((torch.rand(param.shape, generator=generator) * 2 - 1) * bound)
            elif ".lora_B." in name:
                # B = 0 in PEFT's init; non-zero here so every gradient path carries signal.
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


def lora_params(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """LoRA parameters by their adapter-file key (".default" removed, as save_pretrained does)."""
    out = {}
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            out[name.replace(".default", "")] = param
    if len(out) == 0:
        raise SystemExit("no LoRA parameters found")
    return out


def build_batch(case: dict, vocab: int, seed: int) -> dict:
    rows = case["rows"]
    S = sum(rows[0])
    if any(sum(r) != S for r in rows):
        raise SystemExit(f"case {case['name']}: rows must have equal length")
    generator = torch.Generator().manual_seed(seed)
    # ids below vocab - 3 keep the demo tokenizer's special tokens out (pure convention)
    input_ids = torch.randint(0, vocab - 3, (len(rows), S), generator=generator)
    positions, docs, labels = [], [], []
    for row_index, lengths in enumerate(rows):
        p, d = [], []
        for doc, n in enumerate(lengths):
            p += list(range(n))
            d += [doc] * n
        lab = input_ids[row_index].tolist()
        start = 0
        for n in lengths:
            # the first token of a document has no previous token in it to predict it from
            if len(lengths) > 1:
                lab[start] = IGNORE
            for t in range(start, start + min(case["prompt"], n)):
                lab[t] = IGNORE
            start += n
        positions.append(p)
        docs.append(d)
        labels.append(lab)
    labels_t = torch.tensor(labels)
    targets = torch.full_like(labels_t, IGNORE)
    targets[:, :-1] = labels_t[:, 1:]
    return {
        "input_ids": input_ids,
        "position_ids": torch.tensor(positions),
        "docs": torch.tensor(docs),
        "labels": labels_t,
        "targets": targets,
        "packed": any(len(r) > 1 for r in rows),
    }


def block_causal_mask(docs: torch.Tensor, window: int | None, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B,1,S,S]: 0 where key j may be seen by query i, finfo.min elsewhere.

    Allowed: j <= i, same document, and i - j < window when the model has a sliding window.
    """
    S = docs.shape[1]
    i = torch.arange(S)[:, None]
    j = torch.arange(S)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (j > i - window)
    allowed = (allowed[None] & (docs[:, :, None] == docs[:, None, :]))[:, None]
    mask = torch.zeros(allowed.shape, dtype=dtype)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)


def run(model: torch.nn.Module, batch: dict, dtype: torch.dtype, native_packing: bool = False) -> dict:
    model.zero_grad(set_to_none=True)
    # use_cache=False as in training: with a cache, transformers skips its packed-sequence detection
    kwargs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "labels": batch["labels"],
        "use_cache": False,
    }
    if batch["packed"] and not native_packing:
        # only mistral applies its sliding_window (qwen2's is off: use_sliding_window = false)
        window = model.config.sliding_window if model.config.model_type == "mistral" else None
        kwargs["attention_mask"] = block_causal_mask(batch["docs"], window, dtype)
    out = model(**kwargs)
    out.loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in lora_params(model).items()}
    return {"loss": out.loss.detach(), "logits": out.logits.detach(), "grads": grads}


def check_loss_convention(result: dict, batch: dict) -> None:
    """The recorded loss is mean CE of logits[b,t] against targets[b,t] over targets != -100."""
    logits = result["logits"].double().flatten(0, 1)
    targets = batch["targets"].flatten()
    keep = targets != IGNORE
    ce = torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="mean")
    if not torch.allclose(ce, result["loss"].double(), rtol=1e-6, atol=0):
        raise SystemExit(f"loss convention check failed: {ce.item()} vs {result['loss'].item()}")


def max_errors(a: dict, b: dict) -> dict:
    """Largest |a - b| and |a - b| / max|b| of loss, logits and gradients (b is the f64 run)."""

    def err(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        d = (x.double() - y.double()).abs().max().item()
        return d, d / max(y.double().abs().max().item(), 1e-300)

    loss_abs, _ = err(a["loss"], b["loss"])
    logits_abs, logits_rel = err(a["logits"], b["logits"])
    grad_abs, grad_rel = 0.0, 0.0
    # per element: |a - b| / |b| where |b| is not tiny against the tensor's scale
    grad_elem_rel = 0.0
    for k in b["grads"]:
        ab, rel = err(a["grads"][k], b["grads"][k])
        grad_abs, grad_rel = max(grad_abs, ab), max(grad_rel, rel)
        x, y = a["grads"][k].double(), b["grads"][k].double()
        big = y.abs() > 1e-3 * y.abs().max()
        grad_elem_rel = max(grad_elem_rel, ((x - y).abs()[big] / y.abs()[big]).max().item())
    return {
        "loss_abs": loss_abs,
        "loss_rel": loss_abs / abs(b["loss"].item()),
        "logits_abs": logits_abs,
        "logits_rel_to_max": logits_rel,
        "grad_abs": grad_abs,
        "grad_rel_to_max": grad_rel,
        "grad_elementwise_rel": grad_elem_rel,
    }


def attention_note(packed: bool, native_packing: bool) -> str:
    if not packed:
        return "no attention_mask: the model's own causal (sliding-window for mistral) mask, eager"
    if native_packing:
        return "no attention_mask: transformers detects the packed documents from position_ids, eager"
    return "4D block-diagonal causal float mask (0 / finfo.min) as attention_mask, eager"


def compact_json(value: dict) -> str:
    """One top-level key per line, each value on one line (keeps token lists readable and diffs small)."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def save_adapter(model: torch.nn.Module, arch: str, out: Path) -> Path:
    """PeftModel.save_pretrained, then two fields made stable: base_model_name_or_path (the temp dir)
    and the order of target_modules."""
    target = out / "adapters" / f"{arch}-{SIZE}"
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)
    readme = target / "README.md"
    if readme.exists():
        readme.unlink()  # peft's model card template, not needed by anything
    config_path = target / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = f"lathe-tiny/{arch}-{SIZE}"
    config["target_modules"] = sorted(config["target_modules"])  # a Python set: its order varies by run
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return target


def write_case(
    case: dict, index: int, model: torch.nn.Module, identity_: dict, adapter: Path, out: Path, versions: dict
) -> None:
    arch = case["arch"]
    vocab = model.config.vocab_size
    batch = build_batch(case, vocab, seed=100 + index)
    native_packing = case.get("native_packing", False)
    result = run(model, batch, torch.float32, native_packing)
    check_loss_convention(result, batch)
    errors = max_errors(result, run(copy.deepcopy(model).double(), batch, torch.float64, native_packing))
    if batch["packed"]:
        # the 4D block-diagonal mask and transformers' own packed-sequence detection must agree
        other = run(model, batch, torch.float32, not native_packing)
        if not torch.allclose(other["logits"], result["logits"], rtol=0, atol=1e-6):
            raise SystemExit(f"{case['name']}: the 4D mask and transformers' packed detection disagree")
    B, S = batch["input_ids"].shape
    if arch == "mistral" and S <= model.config.sliding_window:
        raise SystemExit(f"{case['name']}: a mistral case needs S > sliding_window")

    tensors = {"logits": result["logits"].contiguous()}
    tensors.update({k: v.contiguous() for k, v in sorted(result["grads"].items())})
    save_file(tensors, out / f"{case['name']}.safetensors", metadata={"format": "pt"})
    init = f"A ~ U(-1/sqrt(in), 1/sqrt(in)), B ~ N(0, 0.05^2), torch seed {ADAPTER_SEED[arch]}"
    meta = {
        "name": case["name"],
        "description": case["description"],
        "model": {
            "arch": arch,
            "size": SIZE,
            "seed": MODEL_SEED,
            "dtype": "f32",
            "tokenizer": TOKENIZER,
            "sha256": identity_,
        },
        "adapter": adapter.relative_to(out).as_posix(),
        "lora": {**LORA, "target_modules": PROJECTIONS, "use_rslora": False, "init": init},
        "attention": attention_note(batch["packed"], native_packing),
        "rows": B,
        "seq_len": S,
        "input_ids": batch["input_ids"].tolist(),
        "position_ids": batch["position_ids"].tolist(),
        "docs": batch["docs"].tolist(),
        "labels": batch["labels"].tolist(),
        "targets": batch["targets"].tolist(),
        "num_items": int((batch["targets"] != IGNORE).sum()),
        "loss": result["loss"].item(),
        "tensors": {
            "file": f"{case['name']}.safetensors",
            "logits": [B, S, vocab],
            "gradients": len(result["grads"]),
        },
        "f32_error": errors,
        "versions": versions,
    }
    (out / f"{case['name']}.json").write_text(compact_json(meta))
    print(f"{case['name']}: loss {meta['loss']:.7f}, f32 vs f64 {json.dumps(errors)}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="tests/fixtures/golden/models")
    args = parser.parse_args()
    out = Path(args.out) if os.path.isabs(args.out) else (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
    }
    with tempfile.TemporaryDirectory(prefix="lathe-golden-") as tmp:
        first, second = Path(tmp) / "a", Path(tmp) / "b"
        make_checkpoints(first)
        make_checkpoints(second)
        ids: dict[str, dict[str, str]] = {}
        models: dict[str, torch.nn.Module] = {}
        adapters: dict[str, Path] = {}
        for arch in ADAPTER_SEED:
            ids[arch] = identity(first / f"{arch}-{SIZE}")
            if ids[arch] != identity(second / f"{arch}-{SIZE}"):
                raise SystemExit(f"lathe's generator is not deterministic for {arch}-{SIZE}")
            models[arch] = attach_lora(load_model(first / f"{arch}-{SIZE}"), arch)
            adapters[arch] = save_adapter(models[arch], arch, out)
        for index, case in enumerate(CASES):
            arch = case["arch"]
            write_case(case, index, models[arch], ids[arch], adapters[arch], out, versions)


if __name__ == "__main__":
    main()
