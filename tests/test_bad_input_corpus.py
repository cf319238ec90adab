"""The bad-input corpus (issue 10 §4): hostile and careless invocations of every command, built here from a few
good files. Each case must end with exit code 2 (1 for a failed `--check`), exactly one line on stderr that names
what is wrong, no traceback, no "unexpected", and the workspace byte for byte as it was: nothing created, truncated
or replaced, the output path included.

A case is (command line, words its message must contain). `{x}` in an argument is a path in the workspace.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nmcli.io.nm_format import POSITIONS_SUFFIX, VALUES_SUFFIX
from tests.conftest import save_tiny_hf


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    words: tuple[str, ...]
    code: int = 2


def _header(tensors: dict, metadata: dict | None = None) -> dict:
    """A safetensors header for float32 tensors given as {name: shape}, packed in order."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * int(torch.tensor(shape).prod()) if shape else 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    return header


def _raw(path: Path, header: object, data: bytes = b"", length: int | None = None) -> None:
    """A file with the given header (any JSON value, or raw bytes) and data; `length` may lie."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)


def _index(folder: Path, weight_map: object, shards: dict[str, dict[str, torch.Tensor]]) -> Path:
    folder.mkdir()
    for name, tensors in shards.items():
        save_file(tensors, str(folder / name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def _rewrite_nm(src: Path, dst: Path, change) -> None:  # noqa: ANN001 - change(tensors) edits in place
    with safe_open(str(src), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    change(tensors)
    save_file(tensors, str(dst), metadata=metadata)


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(8, 16, generator=g), "fc.bias": torch.randn(8, generator=g)}


def _build(ws: Path, cli) -> None:  # noqa: ANN001
    """Every input file the cases read, made once."""
    good = ws / "good.safetensors"
    save_file(_weights(), str(good))
    data = b"\0" * (4 * 8 * 16)
    _raw(ws / "lying-length.safetensors", _header({"fc.weight": (8, 16)}), data, length=10**9)
    _raw(ws / "not-json.safetensors", b"{this is not json", data)
    _raw(ws / "array-header.safetensors", [1, 2, 3], data)
    _raw(ws / "offsets-past-end.safetensors", {"fc.weight": {"dtype": "F32", "shape": [8, 16], "data_offsets": [0, 10**6]}}, data)
    _raw(ws / "unknown-dtype.safetensors", {"fc.weight": {"dtype": "X9", "shape": [8, 16], "data_offsets": [0, 512]}}, data)
    _raw(ws / "shape-vs-bytes.safetensors", {"fc.weight": {"dtype": "F32", "shape": [8, 32], "data_offsets": [0, 512]}}, data)
    _raw(ws / "negative-shape.safetensors", {"fc.weight": {"dtype": "F32", "shape": [-8, 16], "data_offsets": [0, 512]}}, data)
    (ws / "half.safetensors").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (ws / "empty.safetensors").write_bytes(b"")
    (ws / "tiny.safetensors").write_bytes(b"\x01\x02")
    (ws / "text.safetensors").write_text("hello, I am not a checkpoint\n" * 20)
    (ws / "no-checkpoint").mkdir()
    (ws / "no-checkpoint" / "notes.txt").write_text("nothing here")
    _index(ws / "index-missing-shard", {"fc.weight": "b.safetensors"}, {"a.safetensors": _weights()})
    _index(ws / "index-not-strings", {"fc.weight": 3}, {"a.safetensors": _weights()})
    _index(ws / "index-escapes", {"fc.weight": "../good.safetensors"}, {"a.safetensors": {"x": torch.ones(2)}})
    _index(ws / "index-absolute", {"fc.weight": str(good)}, {"a.safetensors": {"x": torch.ones(2)}})
    _index(ws / "index-twice", {"fc.weight": "a.safetensors", "fc.bias": "a.safetensors", "other": "b.safetensors"},
           {"a.safetensors": _weights(), "b.safetensors": {"fc.weight": torch.ones(8, 16), "other": torch.ones(2)}})
    _index(ws / "index-wrong-shard", {"fc.weight": "b.safetensors", "fc.bias": "a.safetensors"},
           {"a.safetensors": _weights(), "b.safetensors": {"other": torch.ones(2)}})
    _index(ws / "index-sub-folder", {"fc.weight": "sub/a.safetensors"}, {"a.safetensors": _weights()})
    _index(ws / "index-symlink", {"fc.weight": "link.safetensors", "x": "a.safetensors"}, {"a.safetensors": {"x": torch.ones(2)}})
    (ws / "index-symlink" / "link.safetensors").symlink_to(good)
    (ws / "index-not-json").mkdir()
    (ws / "index-not-json" / "model.safetensors.index.json").write_text("{nope")
    save_file(_weights(), str(ws / "index-not-json" / "a.safetensors"))
    save_file({"fc.weight": torch.full((8, 16), float("nan"))}, str(ws / "nan.safetensors"))
    save_file({"fc.weight": torch.ones(8, 16, dtype=torch.float8_e4m3fn)}, str(ws / "fp8-only.safetensors"))
    save_file({"fc.weight": torch.zeros(0, 16)}, str(ws / "empty-tensors.safetensors"))
    save_file({**_weights(), "fc.weight" + VALUES_SUFFIX: torch.ones(2)}, str(ws / "suffix-collision.safetensors"))
    assert cli("export", good, "--format", "nm", "--pattern", "2:4", "--prune", "--out", ws / "good.nm.safetensors", "--quiet").exit_code == 0
    positions = "fc.weight" + POSITIONS_SUFFIX

    def flip(t):
        t[positions][0] ^= 0xFF

    _rewrite_nm(ws / "good.nm.safetensors", ws / "nm-flipped.safetensors", flip)
    _rewrite_nm(ws / "good.nm.safetensors", ws / "nm-dtype.safetensors",
                lambda t: t.update({positions: t[positions].to(torch.int32)}))
    _rewrite_nm(ws / "good.nm.safetensors", ws / "nm-shape.safetensors",
                lambda t: t.update({"fc.weight" + VALUES_SUFFIX: t["fc.weight" + VALUES_SUFFIX][:3]}))
    (ws / "empty.onnx").write_bytes(b"")
    (ws / "garbage.onnx").write_bytes(os.urandom(64))
    head = 'name: r\nmethod: fixed-mask\npattern: "2:4"\n'
    recipes = {
        "bomb.yaml": "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\ntargets: {include: [*b, *b]}\n",
        "nan-lr.yaml": head + "optimizer: {name: adamw, lr: .nan}\n",
        "unknown-optimizer.yaml": head + "optimizer: {name: lion-of-judah, lr: 0.001}\n",
        "unknown-key.yaml": head + "training: {epochz: 3}\n",
        "stepped-rate.yaml": head.replace("fixed-mask", "mdgf") + "mask_decay: {schedule: stepped, rate: 0.5}\n",
        "not-a-mapping.yaml": "- just\n- a list\n",
        "huge.yaml": "# " + "x" * 70_000 + "\n",
    }
    for name, text in recipes.items():
        (ws / name).write_text(text)
    (ws / "binary.yaml").write_bytes(os.urandom(300) + b"\0\0")
    (ws / "run-without-checkpoint").mkdir()
    (ws / "run-bad-state" / "checkpoint").mkdir(parents=True)
    torch.save({"hello": 1}, ws / "run-bad-state" / "checkpoint" / "state.pt")
    (ws / "run-pickle" / "checkpoint").mkdir(parents=True)
    (ws / "run-pickle" / "checkpoint" / "state.pt").write_bytes(b"\x80\x04cos\nsystem\nq\x00.")
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (ws / "bad-images" / split / label).mkdir(parents=True)
            (ws / "bad-images" / split / label / "one.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    hf = save_tiny_hf(ws / "hf-bert", "bert")  # no tokenizer files
    save_tiny_hf(ws / "hf-bert-tok", "bert", tokenizer=True)
    config = json.loads((hf / "config.json").read_text())
    (ws / "hf-unknown-type").mkdir()
    (ws / "hf-unknown-type" / "config.json").write_text(json.dumps({**config, "model_type": "bert-of-the-future"}))
    (ws / "hf-unknown-type" / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    (ws / "hf-bad-config").mkdir()
    (ws / "hf-bad-config" / "config.json").write_text("{ not json")
    (ws / "hf-bad-config" / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    (ws / "hf-wider").mkdir()
    (ws / "hf-wider" / "config.json").write_text(json.dumps({**config, "intermediate_size": config["intermediate_size"] * 2}))
    (ws / "hf-wider" / "model.safetensors").write_bytes((hf / "model.safetensors").read_bytes())
    (ws / "empty.txt").write_text("")
    (ws / "binary.txt").write_bytes(os.urandom(500))


P = ("--pattern", "2:4")
CASES = {
    # lying and damaged safetensors files
    "header length past the end": Case(("report", "{lying-length.safetensors}"), ("lying-length.safetensors",)),
    "header not json": Case(("prune", "{not-json.safetensors}", "--out", "{o.safetensors}"), ("not-json.safetensors",)),
    "header a json array": Case(("report", "{array-header.safetensors}"), ("array-header.safetensors",)),
    "offsets past the end": Case(("prune", "{offsets-past-end.safetensors}", "--out", "{o.safetensors}"), ("offsets-past-end.safetensors",)),
    "unknown dtype": Case(("report", "{unknown-dtype.safetensors}"), ("unknown-dtype.safetensors",)),
    "shape disagrees with bytes": Case(("export", "{shape-vs-bytes.safetensors}", "--format", "dense", *P, "--prune", "--out", "{o.safetensors}"), ("shape-vs-bytes.safetensors",)),
    "negative shape": Case(("report", "{negative-shape.safetensors}"), ("negative-shape.safetensors",)),
    "truncated file": Case(("prune", "{half.safetensors}", "--out", "{o.safetensors}"), ("half.safetensors",)),
    "empty file": Case(("report", "{empty.safetensors}"), ("empty.safetensors",)),
    "two-byte file": Case(("prune", "{tiny.safetensors}", "--out", "{o.safetensors}"), ("tiny.safetensors",)),
    "text file named .safetensors": Case(("report", "{text.safetensors}"), ("text.safetensors",)),
    "missing file": Case(("report", "{nope.safetensors}"), ("nope.safetensors",)),
    "folder without checkpoint": Case(("prune", "{no-checkpoint}", "--out", "{o}"), ("no-checkpoint",)),
    # broken shard indexes
    "index names a missing shard": Case(("prune", "{index-missing-shard}", "--out", "{o}"), ("b.safetensors",)),
    "index values not strings": Case(("report", "{index-not-strings}"), ("index",)),
    "index escapes the folder": Case(("prune", "{index-escapes}", "--out", "{o}"), ("'../good.safetensors'",)),
    "index absolute shard": Case(("export", "{index-absolute}", "--format", "nm", *P, "--prune", "--out", "{o}"), ("shard",)),
    "tensor in two shards": Case(("prune", "{index-twice}", "--out", "{o}"), ("fc.weight",)),
    "index points at the wrong shard": Case(("report", "{index-wrong-shard}"), ("fc.weight",)),
    "shard in a sub-folder": Case(("report", "{index-sub-folder}"), ("'sub/a.safetensors'",)),
    "shard symlinked out": Case(("prune", "{index-symlink}", "--out", "{o}"), ("'link.safetensors'",)),
    "index not json": Case(("report", "{index-not-json}"), ("model.safetensors.index.json",)),
    # patterns and odd weights
    "empty pattern": Case(("prune", "{good.safetensors}", "--pattern", "", "--out", "{o.safetensors}"), ("''",)),
    "N equals M": Case(("prune", "{good.safetensors}", "--pattern", "4:4", "--out", "{o.safetensors}"), ("'4:4'",)),
    "empty check": Case(("report", "{good.safetensors}", "--check", ""), ("''",)),
    "pattern no layer takes": Case(("export", "{good.safetensors}", "--format", "dense", "--pattern", "1:1000000", "--prune", "--out", "{o.safetensors}"), ("1:1000000",)),
    "NaN weights": Case(("prune", "{nan.safetensors}", *P, "--out", "{o.safetensors}"), ("fc.weight", "NaN")),
    "NaN weights, nm export --prune": Case(("export", "{nan.safetensors}", "--format", "nm", *P, "--prune", "--out", "{o.safetensors}"), ("fc.weight", "NaN")),
    "NaN weights, compressed-tensors export --prune": Case(("export", "{nan.safetensors}", "--format", "compressed-tensors", *P, "--prune", "--out", "{o}"), ("fc.weight", "NaN")),
    "only fp8 weights": Case(("prune", "{fp8-only.safetensors}", *P, "--out", "{o.safetensors}"), ("float8",)),
    "check fails on a dense file": Case(("report", "{good.safetensors}", "--check", "2:4"), ("2:4",), code=1),
    "layout suffix collision": Case(("export", "{suffix-collision.safetensors}", "--format", "nm", *P, "--prune", "--out", "{o.safetensors}"), ("fc.weight.nm_values",)),
    # damaged nm files
    "nm positions flipped": Case(("report", "{nm-flipped.safetensors}"), ("fc.weight",)),
    "nm positions of another dtype": Case(("export", "{nm-dtype.safetensors}", "--format", "dense", "--out", "{o.safetensors}"), ("fc.weight",)),
    "nm values of another shape": Case(("prune", "{nm-shape.safetensors}", *P, "--out", "{o.safetensors}"), ("fc.weight",)),
    # outputs
    "output exists": Case(("prune", "{good.safetensors}", *P, "--out", "{nan.safetensors}"), ("nan.safetensors", "--force")),
    "output of a file is not .safetensors": Case(("prune", "{good.safetensors}", *P, "--out", "{o.bin}"), ("o.bin",)),
    "empty onnx": Case(("report", "{empty.onnx}"), ("empty.onnx",)),
    "garbage onnx": Case(("report", "{garbage.onnx}"), ("garbage.onnx",)),
    # recipes
    "yaml alias bomb": Case(("recipe", "show", "{bomb.yaml}"), ("bomb.yaml", "alias")),
    "binary recipe": Case(("recipe", "show", "{binary.yaml}"), ("binary.yaml",)),
    "recipe over 64 KiB": Case(("recipe", "show", "{huge.yaml}"), ("huge.yaml",)),
    "NaN learning rate": Case(("recipe", "show", "{nan-lr.yaml}"), ("nan-lr.yaml", "lr")),
    "unknown optimizer": Case(("recipe", "show", "{unknown-optimizer.yaml}"), ("lion-of-judah",)),
    "unknown recipe key": Case(("recipe", "show", "{unknown-key.yaml}"), ("epochz",)),
    "stepped decay with a rate": Case(("recipe", "show", "{stepped-rate.yaml}"), ("rate",)),
    "recipe not a mapping": Case(("recipe", "show", "{not-a-mapping.yaml}"), ("not-a-mapping.yaml",)),
    "infinite --lr": Case(("finetune", "--model", "resnet18", "--lr", "inf", "--out", "{o}"), ("inf",)),
    "example with --data": Case(("finetune", "--data", "{bad-images}", "--out", "{o}"), ("--data",)),
    # resume
    "resume without checkpoint": Case(("finetune", "--model", "resnet18", "--resume", "{run-without-checkpoint}"), ("run-without-checkpoint",)),
    "resume state without keys": Case(("finetune", "--model", "resnet18", "--resume", "{run-bad-state}"), ("state.pt",)),
    "resume state that is a code pickle": Case(("finetune", "--model", "resnet18", "--resume", "{run-pickle}"), ("state.pt",)),
    # data
    "images that do not decode": Case(("eval", "resnet18", "--data", "{bad-images}"), ("one.png",)),
    "empty text": Case(("eval", "{hf-bert-tok}", "--data", "{empty.txt}", "--teacher", "{hf-bert-tok}"), ("empty.txt",)),
    "binary text": Case(("eval", "{hf-bert-tok}", "--data", "{binary.txt}", "--teacher", "{hf-bert-tok}"), ("binary.txt",)),
    # Hugging Face folders
    "hf folder without tokenizer for text": Case(("finetune", "--model", "{hf-bert}", "--seq-len", "32", "--out", "{o}"), ("tokenizer",)),
    "hf model type transformers lacks": Case(("report", "{hf-unknown-type}"), ("bert-of-the-future",)),
    "hf config not json": Case(("prune", "{hf-bad-config}", *P, "--out", "{o}"), ("config.json",)),
    "hf checkpoint of another width": Case(("prune", "{hf-wider}", *P, "--out", "{o}"), ("intermediate",)),
    "teacher text for an encoder": Case(("finetune", "--model", "{hf-bert}", "--data", "teacher:4", "--out", "{o}"), ("teacher:4",)),
    "calibrated prune without architecture": Case(("prune", "{good.safetensors}", *P, "--method", "sparsegpt", "--out", "{o.safetensors}"), ("sparsegpt",)),
}


def _tree(root: Path) -> dict[str, str]:
    """Every entry under root: a digest of each file's bytes, and the target of each link."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    from tests.conftest import Cli

    ws = tmp_path_factory.mktemp("corpus")
    _build(ws, Cli())
    return ws


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_clear_line_and_touches_nothing(cli, workspace, name):
    case = CASES[name]
    args = [a.replace("{", str(workspace) + "/").replace("}", "") if a.startswith("{") else a for a in case.args]
    before = _tree(workspace)
    result = cli(*args)
    assert result.exit_code == case.code, (name, result.output)
    assert "Traceback" not in result.output and "unexpected" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.code == 2:
        assert len(lines) == 1, (name, result.stderr)
    for word in case.words:
        assert word in result.output, (name, word, result.output)
    assert _tree(workspace) == before, f"{name}: the workspace changed"
