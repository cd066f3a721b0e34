"""What AlphaEdit's `mom2_update_weight` (lam_c) costs and buys per edited layer, from the
statistics alone; prints JSON.

    python bench/nullspace_budget.py --samples 8000 --weights 0 30 100 300 1000 --energies 0.1 0.3

For a key k drawn like the preserved keys (E[k k^T] = C), inside the null-space projection P
with eigenvalues e_i of P C P (in units of C's mean eigenvalue) and the ridge l2:
  s = sum_i e_i / (lam_c e_i + l2)            k's reach through the update's system
  delivered = s / (1 + s)                      share of a one-key residual the layer delivers
  damage = sum_i e_i^2 / (lam_c e_i + l2)^2 / s^2
                                               E|D k0|^2 per unit of delivered residual
`damage_vs_hard` is that damage relative to lam_c = 0 (the paper's hard projection).
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm import tqdm

from editors.alphaedit import projection
from editors.editor import Editor, corpus_statistics
from editors.models import default_cache_dir, load_model


def layer_budget(p: torch.Tensor, c: torch.Tensor, l2: float, weights: list[float]) -> dict:
    c = c.double() / (torch.trace(c.double()) / c.shape[0])  # mean eigenvalue 1
    inside = torch.linalg.eigvalsh(p @ c @ p).clamp(min=0)
    e = inside.sort(descending=True).values[: round(float(torch.trace(p)))]
    rows = {}
    for weight in weights:
        reach = e / (weight * e + l2)
        s = float(reach.sum())
        damage = float((reach**2).sum()) / s**2
        rows[weight] = {"delivered": round(s / (1 + s), 3), "damage": float(f"{damage:.3g}")}
    hard = rows[weights[0]]["damage"] if weights[0] == 0 else None
    for row in rows.values():
        row["damage_vs_hard"] = None if hard is None else round(row["damage"] / hard, 3)
    return {"null_dims": len(e), "by_weight": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 30, 100, 300, 1000])
    parser.add_argument(
        "--energies", type=float, nargs="+", help="null-space energy shares (default: shipped)"
    )
    args = parser.parse_args()

    model, tok = load_model(args.model)
    stats = corpus_statistics(model, tok, default_cache_dir() / "stats", samples=args.samples)
    editor = Editor(model, tok, stats)
    hparams = editor.hparams("alphaedit")
    layers = editor.statistics_layers("alphaedit")
    stats.prepare(layers)
    energies = args.energies or [hparams.nullspace_energy]
    report: dict[float, dict] = {energy: {} for energy in energies}
    for layer in tqdm(layers, desc="null-space budget per layer"):
        for energy in energies:
            p = projection(stats, layer, energy)
            c = stats.second_moment(layer)
            report[energy][layer] = layer_budget(p, c, hparams.l2, args.weights)
    print(json.dumps({"model": args.model, "l2": hparams.l2, "by_energy": report}, indent=1))


if __name__ == "__main__":
    main()
