"""The fine-tuning engine end to end on real MNIST digits with a tiny timm ViT (CPU, seconds per run)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from tests.conftest import ROOT

TINY = json.dumps({"img_size": 28, "patch_size": 7, "in_chans": 1, "num_classes": 10, "embed_dim": 32, "depth": 1, "num_heads": 2})
BASE = ["finetune", "--model", "vit_tiny_patch16_224", "--model-kwargs", TINY, "--limit", "128", "--batch-size", "32"]


def _finetune(cli, out, *extra):
    return cli(*BASE, "--out", out, "--quiet", *extra)


def _weights(path):
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "recipe", ["dense", "ste", "sr-ste", "fixed-mask", "mdgf-linear", "mdgf-exponential", "sdgf-stepwise", "sdgf-geometric", "mdgf-sdgf"]
)
def test_every_recipe_gives_an_exactly_compliant_checkpoint(cli, tmp_path, recipe):
    out = tmp_path / recipe
    r = _finetune(cli, out, "--recipe", recipe, "--pattern", "1:8", "--epochs", "2", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary == json.loads((out / "summary.json").read_text())
    assert 0.0 <= summary["final_val_accuracy"] <= 1.0
    assert (out / "recipe.yaml").is_file() and "pattern: '1:8'" in (out / "recipe.yaml").read_text()
    report = cli("report", out / "model.safetensors", "--json", *(["--check", "1:8"] if recipe != "dense" else []))
    assert report.exit_code == 0, report.output
    data = json.loads(report.stdout)
    if recipe == "dense":
        assert summary["all_layers_compliant"] is None and data["summary"]["target_sparsity"] == 0.0
    else:
        assert summary["all_layers_compliant"] is True and data["check"]["passed"] is True
        assert data["summary"]["target_sparsity"] == pytest.approx(7 / 8)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            meta = f.metadata()
        assert meta["nmsparse.pattern"] == "1:8" and json.loads(meta["nmsparse.recipe"])["name"] == recipe
    assert data["flops"]["input_shape"] == [1, 1, 28, 28]


def test_seed_makes_runs_identical_and_different_seeds_differ(cli, tmp_path):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert _finetune(cli, tmp_path / name, "--recipe", "sr-ste", "--epochs", "1", "--seed", seed).exit_code == 0
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_reaches_the_same_final_weights(cli, tmp_path):
    args = ("--recipe", "mdgf-sdgf", "--pattern", "2:4", "--epochs", "3", "--seed", "5")
    assert _finetune(cli, tmp_path / "straight", *args).exit_code == 0
    stopped = _finetune(cli, tmp_path / "split", *args, "--stop-after", "1")
    assert stopped.exit_code == 0 and not (tmp_path / "split" / "model.safetensors").exists()
    assert cli(*BASE, "--resume", tmp_path / "split", "--quiet", *args).exit_code == 0
    straight, split = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    assert all(torch.equal(straight[k], split[k]) for k in straight)


def test_training_time_in_metrics_leaves_evaluations_out(cli, tmp_path, monkeypatch):
    """train_s counts the training steps only: with each evaluation made 0.3 s slower, the added time shows in
    elapsed_s and not in train_s."""
    import time

    from nmcli.train import engine

    evaluate = engine._Run.evaluate
    monkeypatch.setattr(engine._Run, "evaluate", lambda run: (time.sleep(0.3), evaluate(run))[1])
    assert _finetune(cli, tmp_path / "run", "--recipe", "ste", "--epochs", "2", "--eval-every", "1").exit_code == 0
    events = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [e for e in events if e.get("event") in ("eval", "epoch")]
    assert [e["step"] for e in timed] == [1, 2, 3, 4, 5, 6, 7, 8]  # 4 steps an epoch: evaluated once after each
    trained = [e["train_s"] for e in timed]
    assert trained == sorted(trained) and trained[0] > 0
    # 2 start evaluations and 6 mid-epoch / epoch ones before the last event (the final epoch's is skipped), 0.3 s
    # each, are in elapsed_s only
    assert timed[-1]["elapsed_s"] - trained[-1] > 8 * 0.3


def test_resume_refuses_another_recipe(cli, tmp_path):
    assert _finetune(cli, tmp_path / "run", "--recipe", "ste", "--epochs", "2", "--stop-after", "1").exit_code == 0
    r = cli(*BASE, "--resume", tmp_path / "run", "--recipe", "sr-ste", "--epochs", "2")
    assert r.exit_code == 2 and "recipe" in r.stderr and "Traceback" not in r.output


def test_gradient_flow_logging_for_dense_and_sparse(cli, tmp_path):
    for recipe in ("dense", "mdgf-linear"):
        out = tmp_path / recipe
        assert _finetune(cli, out, "--recipe", recipe, "--epochs", "1", "--grad-log-every", "1").exit_code == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        flows = [r["gradient_flow"] for r in records if "gradient_flow" in r]
        assert len(flows) == 4  # 128 samples / batch 32, every step
        layer = flows[-1]["blocks.0.mlp.fc1"]
        assert layer["grad_var"] > 0 and 0.0 <= layer["mask_flip_rate"] <= 1.0 and layer["grad_change_norm"] > 0


def test_image_folder_data_through_timm(cli, tmp_path):
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for label, shade in (("cat", 40), ("dog", 200)):
            folder = tmp_path / "data" / split / label
            folder.mkdir(parents=True)
            for i in range(6):
                noise = torch.randint(0, 30, (16, 16, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(noise + shade).save(folder / f"{i}.png")
    kwargs = json.dumps({"img_size": 16, "patch_size": 4, "num_classes": 2, "embed_dim": 32, "depth": 1, "num_heads": 2})
    r = cli("finetune", "--model", "vit_tiny_patch16_224", "--model-kwargs", kwargs, "--data", tmp_path / "data",
            "--recipe", "ste", "--epochs", "2", "--batch-size", "4", "--out", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["all_layers_compliant"] is True


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--data", "/nonexistent/folder"], "--data /nonexistent/folder: no such folder"),
        (["--num-classes", "3"], "has 3 outputs but --data mnist5k has 10 classes; pass --num-classes 10"),
        (["--recipe", "nope"], "unknown recipe 'nope'"),
        (["--pattern", "1:256"], "no layer can take 1:256 (K="),
        (["--model-kwargs", "{bad json"], "not valid JSON"),
    ],
)
def test_bad_input_is_one_clean_line(cli, tmp_path, extra, message):
    r = _finetune(cli, tmp_path / "o", "--epochs", "1", *extra)
    assert r.exit_code == 2, r.output
    assert message in r.stderr and "Traceback" not in r.output
    assert len([line for line in r.stderr.splitlines() if line.strip()]) == 1


def test_head_that_does_not_match_the_data(cli, tmp_path):
    args = [TINY.replace('"num_classes": 10', '"num_classes": 3') if a == TINY else a for a in BASE]
    r = cli(*args, "--out", tmp_path / "o", "--epochs", "1")
    assert r.exit_code == 2 and "the model's head has 3 outputs" in r.stderr and "--num-classes 10" in r.stderr


def test_empty_image_folder(cli, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "d" / split / "a").mkdir(parents=True)
    r = _finetune(cli, tmp_path / "o", "--data", tmp_path / "d")
    assert r.exit_code == 2 and "Found 0 images" in r.stderr and "d/train" in r.stderr


def test_existing_output_is_not_overwritten(cli, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _finetune(cli, out, "--epochs", "1")
    assert r.exit_code == 2 and "--force" in r.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_two_process_ddp_on_cpu(tmp_path):
    """torchrun, 2 processes, gloo: masks identical on every rank, only rank 0 writes."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "nmcli", *BASE, "--recipe", "sdgf-stepwise", "--pattern", "2:4", "--epochs", "2", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["all_layers_compliant"] is True
    epochs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in l and "event" in l]
    assert [e["masks_identical_across_ranks"] for e in epochs if e["event"] == "epoch"] == [True, True]


def test_built_in_minilm_example_runs_end_to_end_with_its_options(cli, tmp_path):
    r = cli("finetune", "--out", tmp_path / "ex", "--limit", "32", "--pattern", "1:4", "--lr", "1e-4", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["example"] == "minilm" and result["pattern"] == "1:4" and result["all_layers_compliant"] is True
    assert result["start"] == "alps"
    assert list(result["domains"]) == ["news", "python-help"]  # the general domain first: it is the headline
    for domain in result["domains"].values():
        assert domain["one_shot"]["paragraphs"] < 0.95  # 1:4 one-shot loses quality, even with ALPS
        recovered = domain["recovered"]
        assert 0 < recovered["paragraphs"] <= 1 and 0 < recovered["sentences"] <= 1
        assert 0 <= recovered["top1_agreement"] <= 1 and 0 <= recovered["recall_at_10"] <= 1
    assert result["domains"]["news"] != result["domains"]["python-help"]
    from nmcli.commands.finetune import _finetune_line

    line = _finetune_line(result, None)  # what the run prints without --json: each figure named by its domain
    assert "news: " in line and "python-help: " in line and line.index("news: ") < line.index("python-help: ")
    assert cli("report", result["sparse_checkpoint"], "--check", "1:4", "--quiet", "--no-flops").exit_code == 0
    recipe = (tmp_path / "ex" / "recipe.yaml").read_text()
    assert "lr: 0.0001" in recipe and "name: fixed-mask" in recipe


def test_built_in_mnist_example_runs_end_to_end(cli, tmp_path):
    r = cli("finetune", "--example", "mnist", "--out", tmp_path / "ex", "--limit", "64", "--epochs", "1", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["pattern"] == "1:8" and result["all_layers_compliant"] is True
    assert {"dense_val_accuracy", "one_shot_val_accuracy", "sparse_val_accuracy"} <= result.keys()
    assert cli("report", result["sparse_checkpoint"], "--check", "1:8", "--quiet").exit_code == 0


def test_recipes_and_recipe_show(cli, tmp_path):
    listed = json.loads(cli("recipes", "--json").stdout)
    assert {"sdgf-stepwise", "mdgf-linear", "sr-ste"} <= {r["name"] for r in listed}
    r = cli("recipe", "show", "sdgf-stepwise", "--pattern", "1:16", "--steps", "1000", "--plot", tmp_path / "s.png")
    assert r.exit_code == 0, r.output
    assert "steps    640-799    decay    1:16" in r.stdout and "0.312x" in r.stdout
    with Image.open(tmp_path / "s.png") as png:
        assert png.format == "PNG" and png.size[0] > 400
    data = json.loads(cli("recipe", "show", "mdgf-linear", "--steps", "100", "--json").stdout)
    assert [a["alpha"] for a in data["alpha"]][0] == 1.0 and data["phases"]["finetune_start"] == 80
    # methods §5 by hand: 80 decay steps with alpha 0 from step 64 (2:4 -> 0.5), 20 fine-tune steps at 0.5
    assert data["training_flops_relative_to_dense"] == pytest.approx((64 + 16 * 0.5 + 20 * 0.5) / 100)


def test_an_infinite_learning_rate_is_refused_before_training(cli, tmp_path):
    r = _finetune(cli, tmp_path / "run", "--recipe", "ste", "--lr", "inf")
    assert r.exit_code == 2 and "optimizer.lr: inf is not a finite number" in r.stderr
    assert not (tmp_path / "run").exists()


def test_a_diverging_run_stops_and_writes_no_model(cli, tmp_path):
    r = _finetune(cli, tmp_path / "run", "--recipe", "ste", "--lr", "1e30", "--epochs", "1")
    assert r.exit_code == 2 and "diverged" in r.stderr and "Traceback" not in r.output, r.output
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_bf16_from_the_flag_or_the_recipe_is_the_same_autocast(cli, tmp_path):
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text("name: bf16\nmethod: ste\npattern: '2:4'\ntraining: {bf16: true}\n")
    runs = {"plain": ("--recipe", "ste"), "flag": ("--recipe", "ste", "--bf16"), "recipe": ("--recipe", recipe)}
    for name, args in runs.items():
        assert _finetune(cli, tmp_path / name, *args, "--epochs", "1").exit_code == 0
    plain, flag, from_recipe = (_weights(tmp_path / n) for n in runs)
    assert not all(torch.equal(plain[k], flag[k]) for k in plain)  # bf16 autocast changes the numbers
    assert all(torch.equal(flag[k], from_recipe[k]) for k in flag)  # and the recipe key is the same switch


@pytest.mark.parametrize("native", [True, False])
def test_bf16_where_the_cpu_emulates_it_is_named_in_a_warning(cli, tmp_path, monkeypatch, native):
    import nmcli.runtime.device

    monkeypatch.setattr(nmcli.runtime.device, "bf16_is_native", lambda device: native)
    capability = torch.backends.cpu.get_cpu_capability()
    runs = {"bf16": ("--bf16",), "fp32": (), "bf16-quiet": ("--bf16", "--quiet"), "bf16-json": ("--bf16", "--json")}
    for name, extra in runs.items():
        r = cli(*BASE, "--out", tmp_path / name, "--recipe", "ste", "--epochs", "1", *extra)
        assert r.exit_code == 0, r.output
        warned = [line for line in r.stderr.splitlines() if line.startswith("warning: --bf16")]
        expected = not native and name.startswith("bf16")  # --quiet and --json keep it: stderr, not their stdout
        assert name != "bf16-json" or json.loads(r.stdout)
        assert len(warned) == (1 if expected else 0), r.stderr
        assert not expected or f"without native bf16 ({capability})" in warned[0]


def _flows(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["gradient_flow"] for r in records if "gradient_flow" in r]


def test_mask_flips_are_those_of_the_mask_in_use(cli, tmp_path):
    """fixed-mask never changes its mask, so its flip rate is 0 (the probe used to follow a magnitude mask the run
    did not use); a dense run has no mask and is measured against the target pattern's, and says so."""
    fixed, dense = tmp_path / "fixed", tmp_path / "dense"
    for out, recipe in ((fixed, "fixed-mask"), (dense, "dense")):
        args = ("--recipe", recipe, "--epochs", "2", "--grad-log-every", "1", "--lr", "0.05")
        assert _finetune(cli, out, *args).exit_code == 0
    rates = [v["mask_flip_rate"] for flow in _flows(fixed) for v in flow.values() if "mask_flip_rate" in v]
    assert len(rates) > 10 and set(rates) == {0.0}
    assert {v["mask"] for flow in _flows(fixed) for v in flow.values()} == {"in use"}
    assert {v["mask"] for flow in _flows(dense) for v in flow.values()} == {"target"}
    assert any(v.get("mask_flip_rate", 0) > 0 for flow in _flows(dense) for v in flow.values())


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_validation_shards_count_every_sample_exactly_once(world):
    from nmcli.train.distributed import DistEnv, shard

    data = list(range(10))  # 10 samples do not split evenly over 3 or 4 ranks
    seen = [i for rank in range(world) for i in shard(data, DistEnv(rank, world))]
    assert sorted(seen) == data
