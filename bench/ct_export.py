"""The compressed-tensors export of the real checkpoints, loaded back by transformers and run on held-out text.

For SmolLM2-135M (a causal LM whose LM head is tied to its embeddings) and all-MiniLM-L6-v2 (an encoder): prune
2:4 (magnitude), `nmsparse export --format compressed-tensors`, then `from_pretrained` both the pruned folder and
the export in float32 and compare their outputs on held-out Python help text (logits for the LM, the last hidden
state for the encoder), and say which dtype transformers picks when none is given.

    python bench/ct_export.py [--models smollm2,minilm] [--chunks 8]

Needs transformers 4.x with compressed-tensors 0.14.0.1 and accelerate (the test extra), and for SmolLM2 the
folder bench/smollm2.py makes. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.child import run_child  # noqa: E402
from bench.smollm2 import smollm2_folder  # noqa: E402
from nmcli.data.text import PYTHON_HELP, load_texts  # noqa: E402
from nmcli.train.example import minilm_folder  # noqa: E402


def _nmsparse(*args: str) -> float:
    code, stdout, seconds, _ = run_child([sys.executable, "-m", "nmcli", *args])
    if code:
        raise SystemExit(f"nmsparse {' '.join(args)} failed (exit {code}): {stdout}")
    return seconds


def _size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors")) / 2**20


def _outputs(model, batches: list[dict]) -> list[torch.Tensor]:  # noqa: ANN001
    with torch.no_grad():
        results = [model(**batch) for batch in batches]
    return [r.logits if hasattr(r, "logits") else r.last_hidden_state for r in results]


def compare(name: str, folder: Path, chunks: int, scratch: Path) -> None:
    import transformers

    causal = name == "smollm2"
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    pruned, exported = scratch / f"{name}-2of4", scratch / f"{name}-ct"
    prune_s = _nmsparse("prune", str(folder), "--pattern", "2:4", "--out", str(pruned), "--quiet")
    export_s = _nmsparse("export", str(pruned), "--format", "compressed-tensors", "--out", str(exported), "--quiet")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    held_out = load_texts(PYTHON_HELP).heldout[:chunks]
    batches = [tokenizer(text, return_tensors="pt", truncation=True, max_length=256, add_special_tokens=not causal)
               for text in held_out]
    started = time.perf_counter()
    loaded = auto.from_pretrained(exported, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    reference = auto.from_pretrained(pruned, dtype=torch.float32).eval()
    got, want = _outputs(loaded, batches), _outputs(reference, batches)
    worst = max(float((a - b).abs().max()) for a, b in zip(got, want))
    identical = all(torch.equal(a, b) for a, b in zip(got, want))
    tied = ""
    if causal:
        head, embeddings = loaded.get_output_embeddings().weight, loaded.get_input_embeddings().weight
        tied = f"; LM head tied after loading: {head.data_ptr() == embeddings.data_ptr()}"
    default_dtype = next(auto.from_pretrained(exported).parameters()).dtype
    print(f"{name}: prune {prune_s:.1f} s, export {export_s:.1f} s, from_pretrained of the export {load_s:.1f} s; "
          f"safetensors {_size_mib(pruned):.1f} MiB pruned -> {_size_mib(exported):.1f} MiB compressed-tensors; "
          f"outputs on {len(batches)} held-out texts identical to the pruned model's: {identical} (max |diff| {worst:.3g})"
          f"{tied}; dtype when none is given: {default_dtype}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,minilm")
    parser.add_argument("--chunks", type=int, default=8)
    args = parser.parse_args()
    folders = {"minilm": minilm_folder, "smollm2": lambda: smollm2_folder(ROOT / "bench" / ".models" / "smollm2-135m")}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            compare(name, folders[name](), args.chunks, Path(scratch))


if __name__ == "__main__":
    main()
