"""The pretrained study's results page: tables at equal steps and equal FLOPs, paired differences against fixed-mask,
quality vs training FLOPs and vs wall time, and an outcome stated with its criterion (docs/results/<model>/)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nmcli.data.text import NEWS
from nmcli.quality.suite import DOMAIN_SEPARATOR
from nmcli.io.atomic import write_text_atomic
from nmcli.models.architecture import ModelKind
from nmcli.study.page import GRADIENT_FLOW, mean_std, portable_path, save_plot, table_head, table_row


@dataclass(frozen=True)
class Metric:
    key: str  # summary key without the final_ / one_shot_ prefix
    title: str
    higher_is_better: bool
    digits: int

    def better(self, a: float, b: float) -> float:
        """How much better `a` is than `b`, in the metric's units (positive: better)."""
        return a - b if self.higher_is_better else b - a

    def text(self, value: float) -> str:
        return f"{value:,.{self.digits}f}"


METRICS = {
    ModelKind.ENCODER.value: Metric("cosine", "held-out mean embedding cosine to the dense model (higher is better)", True, 4),
    ModelKind.CAUSAL_LM.value: Metric("perplexity", "held-out perplexity (lower is better)", False, 2),
    ModelKind.SEQUENCE_CLASSIFIER.value: Metric("label_agreement", "held-out label agreement with the dense model (higher is better)", True, 4),
}


def general_metric(metric: Metric) -> Metric:
    """The same measure on the built-in general-domain set (`news/cosine`, `news/perplexity`)."""
    return Metric(NEWS + DOMAIN_SEPARATOR + metric.key, metric.title.replace("held-out", "general-domain (`news`)"),
                  metric.higher_is_better, metric.digits)


def _general_section(data: dict[str, Any], metric: Metric, patterns: list[str]) -> list[str]:
    """Quality off the training text's domain, when the runs measured it (studies made before it did not)."""
    general = general_metric(metric)
    if not all(f"final_{general.key}" in run for run in data["runs"]):
        return []
    return [f"## {general.title[0].upper() + general.title[1:]}, mean ± std over seeds", "",
            *_both_budgets(lambda budget: quality_table(data, general, budget, patterns))]


def cell_runs(data: dict[str, Any], budget: str) -> dict[tuple[str, str], list[dict]]:
    """(arm, pattern) -> its runs at this budget; at equal FLOPs an arm whose FLOPs already match the reference's
    keeps its equal-steps runs."""
    cells: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for run in data["runs"]:
        cells[(run["arm"], run["pattern"])][run["budget"]].append(run)
    return {key: by.get(budget) or by["steps"] for key, by in cells.items() if by.get(budget) or by.get("steps")}


def baseline_arm(data: dict[str, Any]) -> str:
    """What practitioners run today: fixed-mask from the best one-shot start in the study."""
    arms = {run["arm"] for run in data["runs"]}
    return "fixed-mask (sparsegpt start)" if "fixed-mask (sparsegpt start)" in arms else "fixed-mask"


def paired_differences(runs: list[dict], base: list[dict], metric: Metric) -> list[float]:
    """Per seed, how much better the arm ends than the baseline (same starting checkpoint, same data order)."""
    by_seed = {r["seed"]: r[f"final_{metric.key}"] for r in base}
    return [metric.better(r[f"final_{metric.key}"], by_seed[r["seed"]]) for r in runs if r["seed"] in by_seed]


def verdict(diffs: list[float]) -> str:
    """The criterion: better (or worse) in every seed, with a mean beyond one standard deviation of the differences."""
    if len(diffs) < 2:
        return "one seed only, no verdict"
    mean, std = mean_std(diffs)
    if all(d > 0 for d in diffs) and mean > std:
        return "better"
    if all(d < 0 for d in diffs) and -mean > std:
        return "worse"
    return "not distinguishable"


def outcome(data: dict[str, Any], metric: Metric, budget: str, patterns: list[str], base_arm: str | None = None,
            candidates: tuple[str, ...] | None = None) -> list[str]:
    """Per pattern: the best arm's paired difference to the baseline (default: fixed-mask, from the best start), and
    every arm that is better by the criterion; `candidates` limits the arms compared."""
    cells, base_arm = cell_runs(data, budget), base_arm or baseline_arm(data)
    lines = []
    for pattern in patterns:
        base = cells.get((base_arm, pattern))
        if not base:
            lines.append(f"- **{pattern}**: no `{base_arm}` runs, so no baseline to compare with.")
            continue
        scored = []
        for (arm, p), runs in cells.items():
            if p == pattern and arm != base_arm and (candidates is None or arm in candidates):
                diffs = paired_differences(runs, base, metric)
                scored.append((statistics.fmean(diffs), arm, diffs))
        if not scored:
            continue
        mean, best, diffs = max(scored)
        sd = mean_std(diffs)[1]
        winners = [arm for _, arm, d in scored if verdict(d) == "better"]
        lines.append(
            f"- **{pattern}**: best `{best}`, {metric.text(abs(mean))} ± {metric.text(sd)} "
            f"{'ahead of' if mean >= 0 else 'behind'} `{base_arm}` paired by seed (ahead in {sum(d > 0 for d in diffs)} "
            f"of {len(diffs)} seeds: {verdict(diffs)}). "
            + (f"Better than `{base_arm}` by the criterion: {', '.join(f'`{w}`' for w in winners)}." if winners
               else f"No recipe beats `{base_arm}` here by the criterion.")
        )
    return lines


def quality_table(data: dict[str, Any], metric: Metric, budget: str, patterns: list[str]) -> list[str]:
    cells = cell_runs(data, budget)
    arms = list(dict.fromkeys(run["arm"] for run in data["runs"]))
    lines = table_head(patterns)
    for arm in arms:
        row = []
        for pattern in patterns:
            runs = cells.get((arm, pattern))
            if not runs:
                row.append("-")
                continue
            mean, std = mean_std([r[f"final_{metric.key}"] for r in runs])
            row.append(f"{metric.text(mean)} ± {metric.text(std)} ({statistics.fmean(r['steps'] for r in runs):.0f} steps)")
        lines.append(table_row(arm, row))
    return lines


def paired_table(data: dict[str, Any], metric: Metric, budget: str, patterns: list[str]) -> list[str]:
    cells, base_arm = cell_runs(data, budget), baseline_arm(data)
    lines = table_head(patterns)
    for arm in dict.fromkeys(run["arm"] for run in data["runs"]):
        if arm == base_arm:
            continue
        row = []
        for pattern in patterns:
            runs, base = cells.get((arm, pattern)), cells.get((base_arm, pattern))
            diffs = paired_differences(runs, base, metric) if runs and base else []
            if not diffs:
                row.append("-")
                continue
            mean, std = mean_std(diffs)
            row.append(f"{mean:+,.{metric.digits}f} ± {metric.text(std)} ({verdict(diffs)})")
        lines.append(table_row(arm, row))
    return lines


def cost_table(data: dict[str, Any], key: str, digits: int, patterns: list[str]) -> list[str]:
    """Mean of a per-run cost (training FLOPs relative to dense, wall seconds) at equal steps and equal FLOPs."""
    lines = table_head([f"{p} steps / FLOPs budget" for p in patterns])
    steps, flops = cell_runs(data, "steps"), cell_runs(data, "flops")
    for arm in dict.fromkeys(run["arm"] for run in data["runs"]):
        row = []
        for pattern in patterns:
            pair = [statistics.fmean(r[key] for r in cells[(arm, pattern)]) for cells in (steps, flops) if (arm, pattern) in cells]
            row.append(" / ".join(f"{v:.{digits}f}" for v in pair) or "-")
        lines.append(table_row(arm, row))
    return lines


def one_shot_lines(data: dict[str, Any], metric: Metric, patterns: list[str]) -> list[str]:
    """The starting points: the dense model and each one-shot start, before any training."""
    lines = []
    for pattern in patterns:
        starts = {}
        for run in data["runs"]:
            if run["pattern"] == pattern and f"one_shot_{metric.key}" in run:  # a dense start's is its magnitude mask
                starts["magnitude" if run["start"] == "dense" else run["start"]] = run[f"one_shot_{metric.key}"]
        if starts:
            lines.append(f"- **{pattern}** one-shot (no training): "
                         + ", ".join(f"{name} {metric.text(value)}" for name, value in sorted(starts.items())))
    return lines


def _plots(data: dict[str, Any], metric: Metric, patterns: list[str], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    arms = list(dict.fromkeys(run["arm"] for run in data["runs"]))
    markers = dict(zip(patterns, "osD^v<>"))
    for key, name, xlabel in (
        ("training_flops_relative_to_dense", "quality_vs_training_flops.png", "training FLOPs of the run (methods §5), in dense runs of the equal-steps budget"),
        ("wall_seconds", "quality_vs_wall_time.png", "wall seconds per run (one thread, evaluations included)"),
    ):
        fig, ax = plt.subplots(figsize=(9, 5))
        for i, arm in enumerate(arms):
            color = f"C{i}"
            for budget, fill in (("steps", color), ("flops", "none")):
                for pattern in patterns:
                    runs = [r for r in data["runs"] if r["arm"] == arm and r["pattern"] == pattern and r["budget"] == budget]
                    if not runs:
                        continue
                    x = statistics.fmean(_cost(r, key, data) for r in runs)
                    y = statistics.fmean(r[f"final_{metric.key}"] for r in runs)
                    ax.plot([x], [y], marker=markers[pattern], color=color, markerfacecolor=fill, linestyle="none",
                            label=f"{arm}" if budget == "steps" and pattern == patterns[0] else None)
        if not metric.higher_is_better:
            ax.set_yscale("log")
        ax.set_title("marker: " + ", ".join(f"{p} {m}" for p, m in markers.items() if p in patterns)
                     + "; filled: equal steps, open: equal FLOPs", fontsize=9)
        files.append(save_plot(fig, ax, out / name, xlabel, f"final {metric.key}, mean over seeds"))
    return files


def _cost(run: dict[str, Any], key: str, data: dict[str, Any]) -> float:
    """A run's cost on the plot's axis: wall seconds, or FLOPs in units of one dense equal-steps run."""
    if key == "wall_seconds":
        return run[key]
    return run[key] * run["steps"] / data["settings"]["steps"]


def _both_budgets(render: Callable[[str], list[str]]) -> list[str]:
    """A section's lines for the equal-steps budget, then for the equal-FLOPs one."""
    return [line for budget, title in (("steps", "Equal steps:"), ("flops", "Equal training FLOPs:"))
            for line in (title, "", *render(budget), "")]


def rerun_command(settings: dict[str, Any], out: Path) -> str:
    """The command that reproduces the study from its recorded settings."""
    budget = f"{settings['budget']['minutes']:g}min" if settings["budget"].get("minutes") else str(settings["budget"]["steps"])
    extra = (f" --data {settings['data']}" if settings["data"] else "") + ("" if settings["sparsegpt_start"] else " --no-sparsegpt-start")
    return (f"nmsparse study --model {portable_path(settings['model'])} --out {portable_path(out)} --budget {budget} --batch-size {settings['batch_size']} "
            f"--seq-len {settings['seq_len']} --lr {settings['lr']:g} --patterns {','.join(settings['patterns'])} "
            f"--recipes {','.join(settings['recipes'])} --seeds {settings['seeds']} --jobs {settings['jobs']}{extra}")


def display_name(folder: str) -> str:
    """A model folder's name; a folder called `model` (inside a wheel) is named by its parent."""
    path = Path(folder)
    return path.parent.name if path.name == "model" else path.name


def write_page(data: dict[str, Any], out: Path) -> None:
    settings = data["settings"]
    metric = METRICS[settings["kind"]]
    patterns = [p for p in settings["patterns"] if any(r["pattern"] == p for r in data["runs"])]
    files = _plots(data, metric, patterns, out)
    base = baseline_arm(data)
    model = display_name(settings["model"])
    budget = (f"{settings['budget']['minutes']:g} min of SR-STE training ({settings['seconds_per_step']:.2f} s per step) = "
              if settings["budget"].get("minutes") else "")
    resumed = (f"; the minutes are the last invocation's: {data['resumed_runs']} of the runs were done by an earlier, "
               "interrupted one" if data.get("resumed_runs") else "")
    lines = [
        f"# Recipe study on a pretrained model: {model}",
        "",
        f"Generated by `nmsparse study --model` from {len(data['runs'])} runs in {data['wall_minutes']} minutes on a 2-core CPU "
        f"({settings['jobs']} runs at a time, one thread each{resumed}). Quality: {metric.title}, on the held-out part of "
        f"`{settings['data'] or 'python-help'}`. Every run: {budget}{settings['steps']} steps of batch {settings['batch_size']} x "
        f"{settings['seq_len']} tokens (one pass over {settings['steps'] * settings['batch_size']} of the "
        f"{settings['training_samples']} training samples), lr {settings['lr']:g}, distillation from the dense model "
        f"with the recipe's default loss for this kind of model ({settings['kind']}). {settings['seeds']} "
        f"seed{'s' if settings['seeds'] > 1 else ''}; a seed changes the data order and sampling only: every run of "
        "every seed starts from the same checkpoint.",
        "",
        f"Rerun: `{rerun_command(settings, out)}`",
        "",
        "Arms: `ste`, `sr-ste` and the gradient-flow recipes start from the dense pretrained weights; `fixed-mask` starts "
        "from the one-shot magnitude mask, and `fixed-mask (sparsegpt start)` from one SparseGPT checkpoint per pattern "
        f"({settings['calib_samples']} calibration samples, made once). The baseline is `{base}`: what practitioners "
        "run today.",
        "",
        "Two budgets: **equal steps** (every arm the same steps) and **equal FLOPs** (an arm that trains denser than "
        "SR-STE per step — MDGF while its decay is on — gets proportionally fewer steps, so that its training FLOPs "
        "(methods §5) match SR-STE's; arms within 2% of SR-STE's FLOPs keep their equal-steps runs). The FLOPs count "
        "the student's training only; the teacher's forward pass costs every arm the same per step.",
        "",
        "## Starting points",
        "",
        *one_shot_lines(data, metric, patterns),
        "",
        "## Outcome",
        "",
        f"Criterion: an arm is *better* than `{base}` when it ends better in every seed and its mean paired difference "
        "exceeds one standard deviation of the paired differences (*worse* likewise).",
        "",
        *_both_budgets(lambda budget: outcome(data, metric, budget, patterns)),
        "The paper's question — do the gradient-flow recipes beat SR-STE? — by the same criterion, paired by seed:",
        "",
        *_both_budgets(lambda budget: outcome(data, metric, budget, patterns, "sr-ste", GRADIENT_FLOW)),
        f"What the budget means: {settings['steps'] * settings['batch_size']} training samples per run "
        f"({100 * settings['steps'] * settings['batch_size'] / settings['training_samples']:.0f}% of one pass over the "
        "training text). A short budget favours the arm with the best start; with longer training the recipes that "
        "start from the dense weights have more time to catch up, so rerun with a larger `--budget` before trusting a "
        "ranking for a long fine-tune.",
        "",
        f"## {metric.title[0].upper() + metric.title[1:]}, mean ± std over seeds",
        "",
        *_both_budgets(lambda budget: quality_table(data, metric, budget, patterns)),
        *_general_section(data, metric, patterns),
        f"## Paired difference to `{base}` (positive: better), mean ± std over seeds",
        "",
        *_both_budgets(lambda budget: paired_table(data, metric, budget, patterns)),
        "## Cost",
        "",
        "Training FLOPs per step relative to dense training (methods §5), equal-steps / equal-FLOPs runs:",
        "",
        *cost_table(data, "training_flops_relative_to_dense", 3, patterns),
        "",
        "Wall seconds per run (one thread, evaluations and the one-shot start included), equal-steps / equal-FLOPs runs:",
        "",
        *cost_table(data, "wall_seconds", 0, patterns),
        "",
        "## Plots",
        "",
        *[f"![{f}]({f})" for f in files],
        "",
        "Raw numbers of every run: `results.json`.",
        "",
    ]
    write_text_atomic(out / "README.md", "\n".join(lines))
