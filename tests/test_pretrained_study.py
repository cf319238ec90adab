"""`nmsparse study --model`: the recipe study on a pretrained Hugging Face model, end to end on a tiny BERT, and the
page's verdicts on hand-made runs (metric direction, paired differences, equal-FLOPs cells)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import minilm_folder, save_tiny_hf
from nmcli.errors import NMSparseError
from nmcli.models.architecture import ModelKind
from nmcli.study.pretrained import StudyBudget
from nmcli.study.pretrained_page import METRICS, cell_runs, outcome, paired_differences, verdict


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """2 seeds x (sr-ste, fixed-mask from magnitude and from SparseGPT, mdgf-exponential) at 2:4, 4 steps each."""
    from typer.testing import CliRunner

    from nmcli.cli import app

    root = tmp_path_factory.mktemp("study")
    folder = save_tiny_hf(root / "bert", "bert", tokenizer=True)
    result = CliRunner().invoke(app, [
        "study", "--model", str(folder), "--out", str(root / "page"), "--budget", "4", "--seeds", "2", "--patterns", "2:4",
        "--recipes", "sr-ste,fixed-mask,mdgf-exponential", "--batch-size", "4", "--seq-len", "32", "--jobs", "1", "--quiet",
    ], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / "page", json.loads((root / "page" / "results.json").read_text())


def _runs(data, arm, budget="steps"):
    return sorted((r for r in data["runs"] if r["arm"] == arm and r["budget"] == budget), key=lambda r: r["seed"])


def test_every_arm_runs_every_seed_from_the_same_start(study):
    _, data = study
    assert {r["arm"] for r in data["runs"]} == {"sr-ste", "fixed-mask", "fixed-mask (sparsegpt start)", "mdgf-exponential"}
    assert all(r["all_layers_compliant"] for r in data["runs"])
    magnitude, sparsegpt = _runs(data, "fixed-mask")[0], _runs(data, "fixed-mask (sparsegpt start)")[0]
    assert sparsegpt["one_shot_cosine"] != magnitude["one_shot_cosine"]  # the SparseGPT start really is another start
    assert _runs(data, "sr-ste")[0]["start_cosine"] == pytest.approx(1.0)  # the dense model itself
    # every seed starts from the same weights, so each start is measured once (seed 0)
    assert all("one_shot_cosine" not in r and "start_cosine" not in r for r in data["runs"] if r["seed"] == 1)
    first, second = _runs(data, "sr-ste")
    assert first["final_cosine"] != second["final_cosine"]  # the seeds see the data in another order


def test_seeds_change_the_data_order_and_nothing_else(tmp_path):
    from nmcli.study.pretrained import Arm, Budget, PretrainedStudySettings, Start, _config

    settings = PretrainedStudySettings(model="unused", out=tmp_path)
    starts = {"2:4": tmp_path / "sparsegpt-2of4"}
    for arm in (Arm("fixed-mask", Start.SPARSEGPT), Arm("fixed-mask", Start.MAGNITUDE), Arm("sr-ste", Start.DENSE)):
        a, b = (_config(settings, arm, "2:4", seed, 10, Budget.STEPS, starts, tmp_path) for seed in (0, 1))
        assert (a.seed, b.seed) == (0, 1) and a.out != b.out
        assert a.start == b.start == {Start.SPARSEGPT: str(starts["2:4"]), Start.MAGNITUDE: "magnitude", Start.DENSE: None}[arm.start]
        assert a.recipe == b.recipe and a.limit == b.limit == 10 * settings.batch_size and a.model == b.model


def test_equal_flops_runs_spend_sr_ste_flops_in_fewer_steps(study):
    """MDGF trains dense while its decay is on: at SR-STE's FLOPs it gets fewer steps; the runs' own FLOPs account
    (the engine's summary) confirms the match to within one step's cost. SR-STE and fixed-mask are not rerun."""
    _, data = study
    reference = _runs(data, "sr-ste")[0]
    budget = reference["training_flops_relative_to_dense"] * reference["steps"]
    scaled = _runs(data, "mdgf-exponential", "flops")
    assert len(scaled) == 2 and scaled[0]["steps"] < reference["steps"]
    spent = scaled[0]["training_flops_relative_to_dense"] * scaled[0]["steps"]
    assert _runs(data, "mdgf-exponential")[0]["training_flops_relative_to_dense"] > reference["training_flops_relative_to_dense"]
    assert abs(spent - budget) <= 1.0  # one dense step at most
    assert not _runs(data, "sr-ste", "flops") and not _runs(data, "fixed-mask", "flops")


def test_the_page_has_both_budgets_the_paired_table_and_the_plots(study):
    page_dir, _ = study
    page = (page_dir / "README.md").read_text()
    for heading in ("## Outcome", "Equal steps:", "Equal training FLOPs:", "## Paired difference to `fixed-mask (sparsegpt start)`",
                    "## Cost", "| mdgf-exponential |", "## General-domain (`news`) mean embedding cosine to the dense model"):
        assert heading in page
    for name in ("quality_vs_training_flops.png", "quality_vs_wall_time.png"):
        with Image.open(page_dir / name) as png:
            assert png.format == "PNG"
        assert f"]({name})" in page


def _run(arm, seed, value, budget="steps", steps=10):
    return {"arm": arm, "pattern": "2:4", "seed": seed, "budget": budget, "steps": steps, "final_perplexity": value}


def test_perplexity_is_better_when_lower_and_the_verdict_needs_every_seed():
    ppl = METRICS[ModelKind.CAUSAL_LM.value]
    base = [_run("fixed-mask", 0, 40.0), _run("fixed-mask", 1, 50.0), _run("fixed-mask", 2, 45.0)]
    good = [_run("sr-ste", 0, 38.0), _run("sr-ste", 1, 47.0), _run("sr-ste", 2, 44.0)]
    assert paired_differences(good, base, ppl) == [2.0, 3.0, 1.0]
    assert verdict([2.0, 3.0, 1.0]) == "better" and verdict([-2.0, -3.0, -1.0]) == "worse"
    assert verdict([2.0, 3.0, -1.0]) == "not distinguishable"  # behind in one seed
    assert verdict([0.1, 5.0, 0.1]) == "not distinguishable"  # mean 1.73 below the spread 2.83
    data = {"runs": base + good}
    line = outcome(data, ppl, "steps", ["2:4"])[0]
    assert "best `sr-ste`, 2.00 ± 1.00 ahead of `fixed-mask`" in line and "ahead in 3 of 3 seeds: better" in line
    worse = {"runs": base + [_run("sr-ste", s, v) for s, v in ((0, 41.0), (1, 52.0), (2, 45.5))]}
    line = outcome(worse, ppl, "steps", ["2:4"])[0]
    assert "best `sr-ste`, 1.17 ± 0.76 behind `fixed-mask`" in line and "No recipe beats `fixed-mask` here" in line
    # against another baseline, among chosen candidates only
    line = outcome(data, ppl, "steps", ["2:4"], "sr-ste", ("fixed-mask",))[0]
    assert "best `fixed-mask`, 2.00 ± 1.00 behind `sr-ste`" in line and "ahead in 0 of 3 seeds: worse" in line


def test_equal_flops_cells_fall_back_to_the_equal_steps_runs():
    runs = [_run("sr-ste", 0, 40.0), _run("mdgf-exponential", 0, 39.0), _run("mdgf-exponential", 0, 42.0, "flops", 6)]
    cells = cell_runs({"runs": runs}, "flops")
    assert cells[("sr-ste", "2:4")][0]["final_perplexity"] == 40.0
    assert cells[("mdgf-exponential", "2:4")][0]["steps"] == 6


def test_a_minutes_budget_becomes_steps_from_a_timed_probe(cli, tmp_path):
    folder = save_tiny_hf(tmp_path / "bert", "bert", tokenizer=True)
    r = cli("study", "--model", folder, "--out", tmp_path / "page", "--budget", "0.01min", "--seeds", "1", "--patterns", "2:4",
            "--recipes", "sr-ste", "--batch-size", "2", "--seq-len", "16", "--no-sparsegpt-start", "--jobs", "1", "--quiet")
    assert r.exit_code == 0, r.output
    settings = json.loads((tmp_path / "page" / "results.json").read_text())["settings"]
    assert 0 < settings["seconds_per_step"] < 5
    assert settings["steps"] == max(1, int(0.6 / settings["seconds_per_step"]))
    assert "0.01 min of SR-STE training" in (tmp_path / "page" / "README.md").read_text()


def test_an_interrupted_study_resumes_where_it_stopped(cli, tmp_path, monkeypatch):
    """The second run fails (as a full disk did in a real 2-hour study): the finished run is kept in runs.jsonl,
    and the same command run again trains only what is missing."""
    import nmcli.study.pool
    from nmcli.train.engine import run_finetune

    calls = []

    def failing_second(config, *args):
        calls.append(config.out.name)
        if len(calls) == 2:
            raise NMSparseError("no space left (simulated)")
        return run_finetune(config, *args)

    folder = save_tiny_hf(tmp_path / "bert", "bert", tokenizer=True)
    args = ("study", "--model", folder, "--out", tmp_path / "page", "--budget", "2", "--seeds", "1", "--patterns", "2:4",
            "--recipes", "sr-ste,fixed-mask", "--batch-size", "2", "--seq-len", "16", "--no-sparsegpt-start", "--jobs", "1", "--quiet")
    monkeypatch.setattr(nmcli.study.pool, "run_finetune", failing_second)
    r = cli(*args)
    assert r.exit_code == 2 and "simulated" in r.stderr
    header, first = (json.loads(line) for line in (tmp_path / "page" / "runs.jsonl").read_text().splitlines())
    assert header["steps"] == 2 and first["arm"] == "sr-ste" and not (tmp_path / "page" / "results.json").exists()

    calls.clear()
    monkeypatch.setattr(nmcli.study.pool, "run_finetune", lambda config, *a: calls.append(config.out.name) or run_finetune(config, *a))
    r = cli(*args)
    assert r.exit_code == 0, r.output
    assert len(calls) == 1 and calls[0].startswith("fixed-mask")  # sr-ste is not trained again
    data = json.loads((tmp_path / "page" / "results.json").read_text())
    assert data["runs"][0] == first and [r["arm"] for r in data["runs"]] == ["sr-ste", "fixed-mask"]
    assert data["resumed_runs"] == 1 and "1 of the runs were done by an earlier" in (tmp_path / "page" / "README.md").read_text()
    assert not (tmp_path / "page" / "runs.jsonl").exists()


def test_budget_is_steps_or_minutes():
    assert StudyBudget.parse("150") == StudyBudget(steps=150)
    assert StudyBudget.parse("20min") == StudyBudget(minutes=20.0)
    assert StudyBudget.parse("2.5min") == StudyBudget(minutes=2.5)
    for bad in ("0", "1.5", "ten", "-3", "5h"):
        with pytest.raises(NMSparseError, match="--budget"):
            StudyBudget.parse(bad)


@pytest.mark.parametrize("args, message", [
    (["--model", "resnet18"], "takes a Hugging Face folder"),
    (["--model", "{bert}", "--recipes", "dense,sr-ste"], "`dense` is the teacher"),
    (["--model", "{bert}", "--recipes", "sr-stee"], "sr-stee"),
    (["--model", "{bert}", "--budget", "100000"], "the data has"),
    (["--model", "{bert}", "--quick"], "--quick and --epochs belong to the MNIST study"),
    (["--patterns", "2:4"], "go with --model"),
])
def test_bad_study_input_is_one_line_and_writes_nothing(cli, tmp_path, args, message):
    folder = save_tiny_hf(tmp_path / "bert", "bert", tokenizer=True)
    out = tmp_path / "out"
    r = cli("study", *[a.replace("{bert}", str(folder)) for a in args], "--out", out, "--quiet")
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output
    assert not out.exists()


def test_the_rerun_line_holds_no_absolute_path_and_still_finds_the_model(tmp_path):
    """A model inside an installed wheel is found through its package by the shell; one in the working folder is
    shown relative to it; one elsewhere by its name only (issue 29: the MiniLM page named this machine's venv)."""
    import os
    import subprocess
    import sys

    from nmcli.study.page import portable_path
    from nmcli.study.pretrained_page import rerun_command

    model = minilm_folder()
    shown = portable_path(model)
    assert not shown.startswith(("/", '"/')) and str(model.parent) not in shown
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    found = subprocess.run(["bash", "-c", f"cd {tmp_path} && realpath {shown}"], capture_output=True, text=True, env=env)
    assert found.returncode == 0 and Path(found.stdout.strip()) == model.resolve(), found.stderr
    assert portable_path(tmp_path / "runs" / "minilm", cwd=tmp_path) == "runs/minilm"
    assert portable_path("/somewhere/else/my model", cwd=tmp_path) == "'my model'"
    settings = {"model": str(model), "budget": {"steps": 40}, "data": None, "sparsegpt_start": True, "batch_size": 8,
                "seq_len": 128, "lr": 3e-4, "patterns": ["2:4"], "recipes": ["sr-ste"], "seeds": 3, "jobs": 2}
    line = rerun_command(settings, Path.cwd() / "docs" / "results" / "minilm")
    assert "--out docs/results/minilm " in line and f"--model {shown} " in line
    assert not any(part.startswith("/") for part in line.split())
