"""The study's results page: tables, plots and an outcome stated with its criteria (docs/results/README.md)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from nmcli.io.atomic import write_text_atomic
from nmcli.nm import parse_pattern
from nmcli.study.page import GRADIENT_FLOW, mean_std, save_plot, table_head, table_row

def summarise(data: dict[str, Any]) -> dict[tuple[str, str | None], dict[str, float]]:
    groups: dict[tuple[str, str | None], list[dict]] = defaultdict(list)
    for run in data["runs"]:
        groups[(run["recipe"], run["pattern"])].append(run)
    out = {}
    for key, runs in groups.items():
        mean, std = mean_std([r["final_val_accuracy"] for r in runs])
        out[key] = {"mean": mean, "std": std, "n": len(runs), "flops": statistics.fmean(r["training_flops_relative_to_dense"] for r in runs)}
    return out


def paired(data: dict[str, Any], recipe: str, other: str, pattern: str) -> list[float]:
    """Per-seed accuracy differences (same starting model), in points."""
    by_seed = defaultdict(dict)
    for run in data["runs"]:
        if run["pattern"] == pattern and run["recipe"] in (recipe, other):
            by_seed[run["seed"]][run["recipe"]] = run["final_val_accuracy"]
    return [100 * (v[recipe] - v[other]) for v in by_seed.values() if recipe in v and other in v]


def outcome(table: dict, patterns: list[str], data: dict[str, Any] | None = None) -> list[str]:
    """Per high-sparsity pattern: the best gradient-flow recipe against SR-STE, with the seed spread.

    With the raw runs, also the paired comparison: every seed starts both recipes from the same dense model, so the
    per-seed difference removes the spread of the starting models.
    """
    lines = []
    for pattern in patterns:
        if ("sr-ste", pattern) not in table:
            continue
        candidates = [(table[(r, pattern)]["mean"], r) for r in GRADIENT_FLOW if (r, pattern) in table]
        if not candidates:
            continue
        _, best = max(candidates)
        gf, sr = table[(best, pattern)], table[("sr-ste", pattern)]
        diff = 100 * (gf["mean"] - sr["mean"])
        spread = 100 * (gf["std"] + sr["std"])
        verdict = "beyond" if abs(diff) > spread else "within"
        word = "beats" if diff > 0 else ("trails" if diff < 0 else "ties with")
        line = (
            f"- **{pattern}**: the best gradient-flow recipe, `{best}`, {word} SR-STE by {diff:+.2f} points "
            f"({100 * gf['mean']:.2f} ± {100 * gf['std']:.2f} vs {100 * sr['mean']:.2f} ± {100 * sr['std']:.2f}); "
            f"that is {verdict} the seed spread (sum of the two standard deviations, {spread:.2f} points)."
        )
        diffs = paired(data, best, "sr-ste", pattern) if data else []
        if len(diffs) > 1:
            m, sd = mean_std(diffs)
            wins = sum(d > 0 for d in diffs)
            line += (
                f" Paired by seed: {m:+.2f} ± {sd:.2f} points, ahead in {wins} of {len(diffs)} seeds"
                f" ({'beyond' if abs(m) > sd else 'within'} one standard deviation of the paired differences)."
            )
        if "flops" in gf and "flops" in sr and sr["flops"]:
            line += f" It spent {gf['flops'] / sr['flops']:.2f}x SR-STE's training FLOPs."
        lines.append(line)
    return lines


def guidance(table: dict, patterns: list[str]) -> list[str]:
    lines = []
    for pattern in patterns:
        ranked = sorted(((v["mean"], v["std"], r) for (r, p), v in table.items() if p == pattern), reverse=True)
        if len(ranked) < 2:
            continue
        (m1, s1, r1), (m2, s2, r2) = ranked[:2]
        close = [r for m, s, r in ranked if m1 - m <= s1 + s]
        tie = f"; statistically tied with {', '.join(f'`{r}`' for r in close if r != r1)}" if len(close) > 1 else ""
        lines.append(f"- **{pattern}**: `{r1}` ({100 * m1:.2f} ± {100 * s1:.2f}){tie}.")
    return lines


def _plots(data: dict[str, Any], table: dict, patterns: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = [r for r in dict.fromkeys(run["recipe"] for run in data["runs"]) if r != "dense"]
    sparsity = {p: 1 - parse_pattern(p).density for p in patterns}
    files = []

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, recipe in enumerate(recipes):
        shown = [(j, table[(recipe, p)]) for j, p in enumerate(patterns) if (recipe, p) in table]
        dodge = (i - (len(recipes) - 1) / 2) * 0.04  # side by side, so error bars stay readable
        ax.errorbar([j + dodge for j, _ in shown], [100 * v["mean"] for _, v in shown],
                    yerr=[100 * v["std"] for _, v in shown], marker="o", capsize=3, label=recipe)
    dense = next((v for (r, _), v in table.items() if r == "dense"), None)
    if dense:
        ax.axhline(100 * dense["mean"], color="black", linestyle="--", label="dense (same budget)")
    ax.set_xticks(range(len(patterns)), [f"{p}\n{100 * sparsity[p]:.1f}% sparse" for p in patterns])
    files.append(save_plot(fig, ax, out / "accuracy_vs_sparsity.png", "N:M pattern", "val accuracy (%), mean ± std over seeds"))

    curve_pattern = data["settings"]["curve_pattern"]
    for key, name, ylabel, log in (("grad_var_curve", "gradient_variance.png", "mean over layers of Var(dL/dW)", True),
                                    ("mask_flip_curve", "mask_flips.png", f"mask flip rate at {curve_pattern}", False)):
        fig, ax = plt.subplots(figsize=(8, 4))
        for recipe in ["dense", *recipes]:
            runs = [r for r in data["runs"] if r["recipe"] == recipe and (r["pattern"] in (curve_pattern, None))]
            if not runs or not runs[0][key]:
                continue
            steps = [s for s, _ in runs[0][key]]
            values = [statistics.fmean(r[key][i][1] for r in runs if len(r[key]) > i) for i in range(len(steps))]
            ax.plot(steps, values, label=recipe, linestyle="--" if recipe == "dense" else "-")
        if log:
            ax.set_yscale("log")
        ax.set_title(f"{curve_pattern} (dense: same model, no mask), mean over seeds")
        files.append(save_plot(fig, ax, out / name, "fine-tuning step", ylabel))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for recipe in recipes:
        points = [(table[(recipe, p)]["flops"], 100 * table[(recipe, p)]["mean"]) for p in patterns if (recipe, p) in table]
        ax.plot(*zip(*points), marker="o", linestyle="none", label=recipe)
    files.append(save_plot(fig, ax, out / "accuracy_vs_training_flops.png",
                       "training FLOPs relative to dense training (methods §5)", "val accuracy (%), mean over seeds"))
    return files


def gradient_summary(data: dict[str, Any]) -> list[str]:
    """Gradient variance relative to dense at the curve pattern: at the first logged step and over the run."""
    pattern = data["settings"]["curve_pattern"]

    def curves(recipe: str) -> list[list[float]]:
        return [[v for _, v in r["grad_var_curve"]] for r in data["runs"]
                if r["recipe"] == recipe and r["pattern"] in (pattern, None) and r["grad_var_curve"]]

    dense = curves("dense")
    if not dense:
        return []
    dense_first = statistics.fmean(c[0] for c in dense)
    dense_all = statistics.fmean(statistics.fmean(c) for c in dense)
    lines = [f"Variance of dL/dW over the entries of each target layer, averaged over layers and seeds, at {pattern}, "
             "relative to the dense recipe (first logged step / whole run):", ""]
    for recipe in dict.fromkeys(r["recipe"] for r in data["runs"]):
        runs = curves(recipe)
        if recipe == "dense" or not runs:
            continue
        first = statistics.fmean(c[0] for c in runs) / dense_first
        overall = statistics.fmean(statistics.fmean(c) for c in runs) / dense_all
        lines.append(f"- `{recipe}`: {first:.1f}x at the first step, {overall:.1f}x over the run")
    return lines


def write_page(data: dict[str, Any], out: Path) -> None:
    settings = data["settings"]
    table = summarise(data)
    patterns = [p for p in settings["patterns"] if any(k[1] == p for k in table)]
    recipes = list(dict.fromkeys(r["recipe"] for r in data["runs"]))
    files = _plots(data, table, patterns, out)
    dense = table.get(next((k for k in table if k[0] == "dense"), ("", None)))
    lines = [
        "# Recipe study: SR-STE vs MDGF vs SDGF from 2:4 to 1:32",
        "",
        f"Generated by `nmsparse study` ({'quick mode' if settings.get('limit') else 'full run'}): "
        f"{settings['seeds']} seeds; a ViT (`{settings['model_kwargs']}`) trained dense for {settings['dense_epochs']} "
        f"epochs per seed on mnist5k (4,000 / 1,000 real MNIST digits{', limited to ' + str(settings['limit']) if settings.get('limit') else ''}); "
        f"then every recipe fine-tunes that model for {settings['epochs']} epochs (same budget per run; `dense` continues "
        f"dense training). Wall time {data['wall_minutes']} minutes on a 2-core CPU, {settings['jobs']} runs at a time, "
        "one thread each. Rerun: `nmsparse study --out docs/results` (or `--quick`).",
        "",
        f"Dense models before fine-tuning: {', '.join(f'{100 * a:.2f}' for a in data['pretrained_val_accuracy'])} % val accuracy.",
        "",
        "## Outcome at high sparsity (1:8 and above)",
        "",
        "Criterion: a difference counts as *beyond the seed spread* when it exceeds the sum of the two standard deviations.",
        "",
        *(outcome(table, [p for p in patterns if p in ("1:8", "1:16", "1:32")], data) or ["- (no high-sparsity runs)"]),
        "",
        "Caveats of this setup: each fine-tuning run is short (the same few epochs for every recipe), so recipes that "
        "spend part of the budget at denser stages (SDGF) or with alpha > 0 (MDGF) have less time at the target "
        "pattern; the unpaired standard deviations are dominated by how good each seed's starting dense model is, "
        "which the paired comparison removes; and one small ViT on 4,000 MNIST digits is not ImageNet.",
        "",
        "## Gradient variance",
        "",
        *gradient_summary(data),
        "",
        "## Which recipe should I pick",
        "",
        "The best mean per pattern, with the recipes whose mean lies within the two (unpaired) standard deviations; "
        "see the paired comparison above for what holds seed by seed, and the training FLOPs table for the cost:",
        "",
        *guidance(table, patterns),
        "",
        "## Validation accuracy (%), mean ± std over seeds",
        "",
        *table_head(patterns),
    ]
    for recipe in recipes:
        if recipe == "dense":
            lines.append(table_row("dense (same budget)", [f"{100 * dense['mean']:.2f} ± {100 * dense['std']:.2f}" for _ in patterns]))
            continue
        cells = [f"{100 * table[(recipe, p)]['mean']:.2f} ± {100 * table[(recipe, p)]['std']:.2f}" if (recipe, p) in table else "-" for p in patterns]
        lines.append(table_row(recipe, cells))
    lines += ["", "## Training FLOPs relative to dense training (methods §5)", "", *table_head(patterns)]
    for recipe in recipes:
        if recipe == "dense":
            continue
        lines.append(table_row(recipe, [f"{table[(recipe, p)]['flops']:.3f}" if (recipe, p) in table else "-" for p in patterns]))
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in files]
    lines += ["", "Raw numbers, gradient-variance and mask-flip curves of every run: `results.json`.", ""]
    write_text_atomic(out / "README.md", "\n".join(lines))
