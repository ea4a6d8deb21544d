"""Golden values for lathe's DPO objective (steps/train/dpo.ts), from PyTorch autograd.

Written from the formulas of trl's DPOTrainer (FORMATS.md "DPO as trl computes it"), not from
lathe's code: per pair, sequence log-probs are sums of the answer tokens' log-softmax (means for
ipo), h = (pi_c - pi_r) - (rho_c - rho_r), and

    sigmoid  -(1-e)*logsigmoid(b*h) - e*logsigmoid(-b*h)
    robust   (-(1-e)*logsigmoid(b*h) + e*logsigmoid(-b*h)) / (1-2e)
    hinge    relu(1 - b*h)
    ipo      (h - 1/(2b))**2

averaged over pairs, plus rpo_alpha * (mean NLL of the chosen answers' tokens). Rewards are
b*(pi - rho), accuracy the share with chosen reward > rejected reward, logits/* the mean of
the policy logits over the answers' tokens and the vocabulary.

Each case is a batch of random policy logits [pairs, 2, S, V] (chosen = side 0), targets with
-100 on prompt and padding positions, and random reference log-probs; the script records the
loss, the metrics and d loss / d logits (float64, torch.autograd). The TypeScript test feeds
the same logits through lathe's objective (per-token log-probs, sequence sums, pair losses,
per-token weights, softmax - onehot) and compares.

Usage (from the repository root; Debian's python3-torch and python3-numpy):

    /usr/bin/python3 scripts/golden/dpo.py [--out tests/fixtures/golden/dpo.json]

The output is deterministic (numpy's seeded generator, float64 throughout).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CASES = [
    {"name": "sigmoid", "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": None, "reference_free": False},
    {"name": "sigmoid_smoothed", "loss_type": "sigmoid", "beta": 0.3, "label_smoothing": 0.2, "rpo_alpha": None, "reference_free": False},
    {"name": "robust", "loss_type": "robust", "beta": 0.2, "label_smoothing": 0.1, "rpo_alpha": None, "reference_free": False},
    {"name": "hinge", "loss_type": "hinge", "beta": 0.5, "label_smoothing": 0.0, "rpo_alpha": None, "reference_free": False},
    {"name": "ipo", "loss_type": "ipo", "beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": None, "reference_free": False},
    {"name": "sigmoid_rpo", "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": 0.5, "reference_free": False},
    {"name": "reference_free", "loss_type": "sigmoid", "beta": 0.1, "label_smoothing": 0.0, "rpo_alpha": None, "reference_free": True},
]

PAIRS, S, V = 3, 7, 11


def batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(PAIRS, 2, S, V))
    targets = np.full((PAIRS, 2, S), -100, dtype=np.int64)
    for p in range(PAIRS):
        prompt = 1 + int(rng.integers(0, 3))
        for side in range(2):
            end = S - int(rng.integers(0, 3))  # padding after the answer
            for t in range(prompt, end):
                targets[p, side, t] = int(rng.integers(0, V))
    ref = rng.normal(-12.0, 3.0, size=(PAIRS, 2))
    return {"logits": logits, "targets": targets, "ref": ref}


def dpo(case: dict, b: dict) -> dict:
    logits = torch.tensor(b["logits"], dtype=torch.float64, requires_grad=True)
    targets = torch.tensor(b["targets"])
    mask = targets != -100
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logp = logp * mask
    sums = logp.sum(-1)  # [pairs, 2]
    counts = mask.sum(-1).to(torch.float64)
    seq = sums / counts if case["loss_type"] == "ipo" else sums
    ref = torch.tensor(b["ref"], dtype=torch.float64)
    ref = torch.zeros_like(ref) if case["reference_free"] else (ref / counts if case["loss_type"] == "ipo" else ref)
    beta, e = case["beta"], case["label_smoothing"]
    h = (seq[:, 0] - seq[:, 1]) - (ref[:, 0] - ref[:, 1])
    kind = case["loss_type"]
    if kind == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif kind == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif kind == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean()
    nll = -(sums[:, 0].sum()) / counts[:, 0].sum()
    if case["rpo_alpha"] is not None:
        loss = loss + case["rpo_alpha"] * nll
    loss.backward()
    chosen_rewards = beta * (seq[:, 0] - ref[:, 0]).detach()
    rejected_rewards = beta * (seq[:, 1] - ref[:, 1]).detach()
    lg = logits.detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(torch.float64).mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": seq[:, 0].detach().mean().item(),
        "logps/rejected": seq[:, 1].detach().mean().item(),
        "logits/chosen": lg[:, 0][mask[:, 0]].mean().item(),
        "logits/rejected": lg[:, 1][mask[:, 1]].mean().item(),
    }
    return {
        "loss": loss.item(),
        "metrics": metrics,
        "dlogits": logits.grad.reshape(-1).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/fixtures/golden/dpo.json")
    args = parser.parse_args()
    out = []
    for i, case in enumerate(CASES):
        b = batch(100 + i)
        result = dpo(case, b)
        out.append({
            **case,
            "pairs": PAIRS, "S": S, "V": V,
            "logits": b["logits"].reshape(-1).tolist(),
            "targets": b["targets"].reshape(-1).tolist(),
            "ref": b["ref"].reshape(-1).tolist(),
            **result,
        })
    meta = {"torch": torch.__version__, "numpy": np.__version__, "cases": out}
    Path(args.out).write_text(json.dumps(meta) + "\n")


if __name__ == "__main__":
    main()
