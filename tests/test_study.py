"""The study pipeline end to end in quick mode, and the page's verdicts on hand-made numbers."""

import json

from PIL import Image

from nmcli.study.mnist_page import guidance, outcome


def test_quick_study_writes_the_page_plots_and_raw_results(cli, tmp_path):
    r = cli("study", "--quick", "--out", tmp_path, "--jobs", "1", "--quiet")
    assert r.exit_code == 0, r.output
    data = json.loads((tmp_path / "results.json").read_text())
    runs = data["runs"]
    assert len(runs) == 2 * (8 * 2 + 1)  # 2 seeds x (8 sparse recipes x 2 patterns + dense)
    assert {r["recipe"] for r in runs} >= {"sr-ste", "mdgf-linear", "sdgf-geometric", "mdgf-sdgf", "dense"}
    assert all(r["grad_var_curve"] for r in runs)
    page = (tmp_path / "README.md").read_text()
    assert "| sr-ste |" in page and "## Outcome at high sparsity" in page and "## Which recipe should I pick" in page
    for name in ("accuracy_vs_sparsity.png", "gradient_variance.png", "mask_flips.png", "accuracy_vs_training_flops.png"):
        with Image.open(tmp_path / name) as png:
            assert png.format == "PNG"
        assert f"]({name})" in page


def test_outcome_and_guidance_state_the_spread():
    table = {
        ("sr-ste", "1:8"): {"mean": 0.85, "std": 0.01},
        ("mdgf-linear", "1:8"): {"mean": 0.90, "std": 0.01},
        ("sdgf-stepwise", "1:8"): {"mean": 0.86, "std": 0.01},
        ("sr-ste", "1:16"): {"mean": 0.80, "std": 0.03},
        ("sdgf-stepwise", "1:16"): {"mean": 0.81, "std": 0.02},
    }
    lines = outcome(table, ["1:8", "1:16"])
    assert "`mdgf-linear`, beats SR-STE by +5.00 points" in lines[0] and "beyond the seed spread" in lines[0]
    assert "`sdgf-stepwise`, beats SR-STE by +1.00 points" in lines[1] and "within the seed spread" in lines[1]
    advice = guidance(table, ["1:8", "1:16"])
    assert advice[0].startswith("- **1:8**: `mdgf-linear` (90.00 ± 1.00).")
    assert "tied with `sr-ste`" in advice[1]


def test_paired_comparison_and_gradient_summary_on_hand_made_runs():
    from nmcli.study.mnist_page import gradient_summary, paired

    def run(recipe, seed, acc, curve):
        return {"recipe": recipe, "pattern": None if recipe == "dense" else "1:8", "seed": seed,
                "final_val_accuracy": acc, "grad_var_curve": [[0, curve[0]], [10, curve[1]]]}

    data = {"settings": {"curve_pattern": "1:8"}, "runs": [
        run("dense", 0, 0.9, [1.0, 1.0]), run("dense", 1, 0.7, [1.0, 1.0]),
        run("sr-ste", 0, 0.80, [100.0, 2.0]), run("sr-ste", 1, 0.60, [300.0, 4.0]),
        run("mdgf-linear", 0, 0.82, [1.0, 3.0]), run("mdgf-linear", 1, 0.63, [1.0, 5.0]),
    ]}
    assert [round(d, 6) for d in paired(data, "mdgf-linear", "sr-ste", "1:8")] == [2.0, 3.0]
    lines = gradient_summary(data)
    assert "- `sr-ste`: 200.0x at the first step, 101.5x over the run" in lines
    assert "- `mdgf-linear`: 1.0x at the first step, 2.5x over the run" in lines


def test_a_terminated_study_leaves_no_workers_and_no_scratch_folder(tmp_path):
    """SIGTERM during the runs: the study exits, its worker processes are gone, its scratch folder is removed."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    study = subprocess.Popen([sys.executable, "-m", "nmcli", "study", "--quick", "--out", str(tmp_path / "out"),
                              "--jobs", "2", "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ours() -> list[int]:
        """Live processes started with this test's TMPDIR (the study and its workers)."""
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                if f"TMPDIR={scratch}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                    if b"Z" not in (proc / "stat").read_bytes().split(b")")[-1][:3]:
                        pids.append(int(proc.name))
            except OSError:
                pass
        return pids

    deadline = time.monotonic() + 120
    while len(ours()) < 3 and time.monotonic() < deadline:  # the study and both workers
        time.sleep(0.2)
    assert len(ours()) >= 3 and list(scratch.glob("nmsparse-study-*"))
    study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=60) == 128 + signal.SIGTERM
    deadline = time.monotonic() + 10
    while ours() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ours() == [] and not list(scratch.glob("nmsparse-study-*"))
