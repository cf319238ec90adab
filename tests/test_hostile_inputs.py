"""Hostile or careless inputs found by the bad-input audit (issue 10): each is refused with one clear line, exit 2,
and nothing outside the output path is created or changed; or, where the input is legal, the result is exact."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from nmcli.io.nm_format import POSITIONS_SUFFIX
from nmcli.io.opener import load_nm
from nmcli.nm import LINEAR, NMPattern, apply_nm
from tests.test_cli_errors import _assert_clean_error


def _sharded(folder, shards: dict[str, dict[str, torch.Tensor]], weight_map=None):
    """A folder with the given shard files and an index (by default the true one)."""
    folder.mkdir()
    true_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(folder / shard))
        true_map.update({name: shard for name in tensors})
    index = {"metadata": {}, "weight_map": true_map if weight_map is None else weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _w(seed=0):
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(seed))


def _snapshot(path):
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.parametrize("escape", ["../victim.safetensors", "ABSOLUTE"])
def test_an_index_cannot_name_a_shard_outside_its_folder(cli, tmp_path, escape):
    victim = tmp_path / "victim.safetensors"
    save_file({"other": torch.ones(50, 50)}, str(victim))
    before = _snapshot(victim)
    shard = str(victim) if escape == "ABSOLUTE" else escape
    folder = _sharded(tmp_path / "src", {"a.safetensors": {"fc.weight": _w()}}, {"fc.weight": shard})
    out = tmp_path / "out"
    for args in (("prune", folder, "--out", out), ("export", folder, "--format", "dense", "--pattern", "2:4",
                                                    "--prune", "--out", out), ("report", folder)):
        _assert_clean_error(cli(*args), "shard", repr(shard))
    assert _snapshot(victim) == before and not out.exists()


def test_a_shard_that_is_a_symlink_out_of_the_folder_is_refused(cli, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"fc.weight": _w()}, str(outside))
    folder = _sharded(tmp_path / "src", {"a.safetensors": {"x": torch.ones(2)}}, {"x": "a.safetensors", "fc.weight": "b.safetensors"})
    (folder / "b.safetensors").symlink_to(outside)
    _assert_clean_error(cli("report", folder), "'b.safetensors'", "inside")


def test_shards_in_a_sub_folder_get_a_clear_message(cli, tmp_path):
    folder = _sharded(tmp_path / "src", {"a.safetensors": {"fc.weight": _w()}}, {"fc.weight": "sub/a.safetensors"})
    _assert_clean_error(cli("report", folder), "'sub/a.safetensors'", "plain file name")


def test_a_tensor_stored_in_two_shards_is_an_error_not_a_silent_pick(cli, tmp_path):
    shards = {"a.safetensors": {"fc.weight": _w(0)}, "b.safetensors": {"fc.weight": _w(1), "y": torch.ones(2)}}
    folder = _sharded(tmp_path / "src", shards, {"fc.weight": "a.safetensors", "y": "b.safetensors"})
    _assert_clean_error(cli("prune", folder, "--out", tmp_path / "o"), "fc.weight", "a.safetensors", "b.safetensors")


def test_an_index_that_points_at_the_wrong_shard_is_an_error(cli, tmp_path):
    folder = _sharded(tmp_path / "src", {"a.safetensors": {"x": torch.ones(2)}, "b.safetensors": {"fc.weight": _w()}},
                      {"x": "a.safetensors", "fc.weight": "a.safetensors"})
    _assert_clean_error(cli("report", folder), "fc.weight", "listed but not found in its shard")


@pytest.mark.parametrize("index", [[1, 2], {"weight_map": ["a"]}, {"weight_map": {"fc.weight": 3}}, "text"])
def test_an_index_that_is_not_an_object_of_strings_is_an_error(cli, tmp_path, index):
    folder = _sharded(tmp_path / "src", {"a.safetensors": {"fc.weight": _w()}})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _assert_clean_error(cli("report", folder), "weight_map")


def test_symlinked_side_files_are_not_copied_by_value(cli, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("private")
    os.chmod(secret, 0o600)
    folder = _sharded(tmp_path / "src", {"model.safetensors": {"fc.weight": _w()}})
    (folder / "tokenizer.json").symlink_to(secret)
    (folder / "vocab.txt").write_text("a\nb\n")
    out = tmp_path / "out"
    r = cli("prune", folder, "--out", out)
    assert r.exit_code == 0, r.output
    assert (out / "vocab.txt").read_text() == "a\nb\n"
    assert not (out / "tokenizer.json").exists()
    assert "not copied" in r.output and "tokenizer.json" in r.output


@pytest.mark.parametrize("m", [256, 257, 512])
def test_nm_export_stores_positions_of_any_group_size_exactly(cli, tmp_path, m):
    k = 2 * m if m != 257 else 257
    w = torch.randn(3, k, generator=torch.Generator().manual_seed(m))
    src = tmp_path / "w.safetensors"
    save_file({"fc.weight": w}, str(src))
    out = tmp_path / "nm.safetensors"
    r = cli("export", src, "--format", "nm", "--pattern", f"1:{m}", "--prune", "--out", out)
    assert r.exit_code == 0, r.output
    expected = apply_nm(w, NMPattern(1, m), LINEAR)
    assert torch.equal(load_nm(out)["fc.weight"], expected)
    assert cli("report", out, "--check", f"1:{m}", "-q").exit_code == 0


def _nm_file(cli, tmp_path):
    src = tmp_path / "w.safetensors"
    save_file({"fc.weight": _w()}, str(src))
    out = tmp_path / "nm.safetensors"
    assert cli("export", src, "--format", "nm", "--pattern", "2:4", "--prune", "--out", out).exit_code == 0
    return out


def _rewrite(path, change):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata=meta)


@pytest.mark.parametrize("corruption", ["duplicate", "descending"])
def test_corrupt_nm_positions_are_refused_by_name(cli, tmp_path, corruption):
    out = _nm_file(cli, tmp_path)
    key = "fc.weight" + POSITIONS_SUFFIX

    def corrupt(tensors):  # 2-bit codes, 2 per group: byte 0 holds group 0 (codes 0, 1) and group 1 (codes 2, 3)
        codes = [1, 1] if corruption == "duplicate" else [3, 0]
        tensors[key][0] = (tensors[key][0] & 0xF0) | codes[0] | (codes[1] << 2)

    _rewrite(out, corrupt)
    _assert_clean_error(cli("report", out, "--check", "2:4"), "fc.weight", "corrupt positions")
    with pytest.raises(Exception, match="corrupt positions"):
        load_nm(out)


def test_nm_tables_of_the_wrong_dtype_are_refused(cli, tmp_path):
    out = _nm_file(cli, tmp_path)
    _rewrite(out, lambda t: t.__setitem__("fc.weight" + POSITIONS_SUFFIX, t["fc.weight" + POSITIONS_SUFFIX].to(torch.int8)))
    _assert_clean_error(cli("report", out), "fc.weight", "positions")


@pytest.mark.parametrize("fmt,clash", [("nm", "fc.weight.nm_values"), ("compressed-tensors", "fc.compressed")])
def test_names_that_collide_with_a_formats_added_names_are_refused(cli, tmp_path, fmt, clash):
    src = tmp_path / "w.safetensors"
    save_file({"fc.weight": apply_nm(_w(), NMPattern(2, 4), LINEAR), clash: torch.ones(3)}, str(src))
    out = tmp_path / ("out.safetensors" if fmt == "nm" else "out")
    _assert_clean_error(cli("export", src, "--format", fmt, "--pattern", "2:4", "--out", out), clash, "two tensors")
    assert not out.exists()


@pytest.mark.parametrize("option", ["--check", "--pattern"])
def test_an_empty_pattern_is_an_error_not_the_gate_switched_off(cli, tmp_path, option):
    src = tmp_path / "dense.safetensors"
    save_file({"fc.weight": _w()}, str(src))
    args = ("report", src, "--check", "") if option == "--check" else ("export", src, "--format", "nm", "--pattern", "",
                                                                       "--out", tmp_path / "o.safetensors")
    _assert_clean_error(cli(*args), "invalid N:M pattern ''")


def test_paths_with_rich_markup_are_printed_as_they_are(cli, tmp_path):
    missing = tmp_path / "x[/]y[bold].safetensors"
    _assert_clean_error(cli("report", missing), "x[/]y[bold].safetensors")


def _recipe(tmp_path, text: str | bytes):
    path = tmp_path / "r.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_a_yaml_alias_bomb_is_refused_before_it_expands(cli, tmp_path):
    levels = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    levels += [f"a{i}: &a{i} [{','.join(['*a' + str(i - 1)] * 9)}]" for i in range(1, 9)]
    bomb = "\n".join(levels) + "\nname: bomb\nmethod: ste\ntargets: {include: *a8}\n"  # 9**9 strings if expanded
    assert len(bomb) < 1000
    path = _recipe(tmp_path, bomb)
    _assert_clean_error(cli("recipe", "show", path), str(path), "anchors and aliases")


def test_recipe_errors_never_print_a_huge_value_whole(cli, tmp_path):
    path = _recipe(tmp_path, "name: big\nmethod: ste\ntargets: {include: " + "x" * 50_000 + "}\n")
    r = cli("recipe", "show", path)
    _assert_clean_error(r, str(path), "targets.include")
    assert len(r.stderr) < 600


@pytest.mark.parametrize("content,needle", [(b"\xff\xfe\x00binary", "not a text file"), (b"#" * 70_000, "too large")])
def test_binary_or_oversized_recipe_files_are_named(cli, tmp_path, content, needle):
    path = _recipe(tmp_path, content)
    _assert_clean_error(cli("recipe", "show", path), str(path), needle)


@pytest.mark.parametrize("extra", [("--bf16",), ("--batch-size", "8"), ("--data", "elsewhere"), ("--device", "cuda"),
                                   ("--grad-log-every", "5"), ("--checkpoint", "w.pth")])
def test_the_built_in_example_refuses_options_it_would_ignore(cli, tmp_path, extra):
    out = tmp_path / "ex"
    _assert_clean_error(cli("finetune", "--out", out, *extra), extra[0], "built-in example")
    assert not out.exists()


def test_the_built_in_example_reads_its_recipe_before_any_training(cli, tmp_path):
    path = _recipe(tmp_path, "name: broken\nmethod: nonsense\n")
    out = tmp_path / "ex"
    _assert_clean_error(cli("finetune", "--recipe", path, "--out", out), str(path), "method")
    assert not out.exists()


def test_output_paths_and_names_with_markup_or_emoji_codes_print_as_they_are(cli, tmp_path):
    src = tmp_path / "w.safetensors"
    save_file({"fc.weight": _w()}, str(src))
    (tmp_path / "o[").mkdir()
    out = tmp_path / "o[/]x[bold]:smile:.safetensors"  # a file in the folder "o["
    r = cli("prune", src, "--out", out)
    assert r.exit_code == 0, r.output
    assert str(out) in r.stdout and out.is_file()
    report = cli("report", out, "--check", "2:4")
    assert report.exit_code == 0 and "o[/]x[bold]:smile:" in report.stdout


def test_a_file_of_empty_tensors_is_copied_not_crashed(cli, tmp_path):
    src = tmp_path / "empty.safetensors"
    save_file({"a": torch.zeros(0, 4), "b": torch.zeros(0)}, str(src))
    out = tmp_path / "o.safetensors"
    assert cli("report", src).exit_code == 0
    assert cli("export", src, "--format", "dense", "--pattern", "2:4", "--out", out).exit_code == 2  # nothing is N:M
    r = cli("prune", src, "--out", out)
    _assert_clean_error(r, "no layer can take 2:4")
    from nmcli.io.rewrite import copy_item, rewrite
    from nmcli.io.opener import open_path

    ckpt = open_path(src)
    rewrite(ckpt, lambda names: [copy_item(ckpt, n) for n in names], out, {}, force=False)  # the pipeline itself
    assert {k: tuple(v.shape) for k, v in load_file(str(out)).items()} == {"a": (0, 4), "b": (0,)}


@pytest.mark.parametrize("command", ["export", "prune"])
def test_a_pattern_no_layer_can_take_is_an_error_for_every_command(cli, tmp_path, command):
    src = tmp_path / "w.safetensors"
    save_file({"fc.weight": _w()}, str(src))
    out = tmp_path / "o.safetensors"
    args = ("--format", "nm", "--prune") if command == "export" else ()
    _assert_clean_error(cli(command, src, "--pattern", "1:1000000", *args, "--out", out), "no layer can take 1:1000000")
    assert not out.exists()


def test_float8_weights_are_reported_and_skipped_not_crashed(cli, tmp_path):
    src = tmp_path / "f8.safetensors"
    w8 = apply_nm(_w(), NMPattern(2, 4), LINEAR).to(torch.float8_e4m3fn)
    save_file({"fc.weight": w8, "fc2.weight": _w(1)}, str(src))
    report = cli("report", src, "--json")
    assert report.exit_code == 0, report.output
    rows = {row["name"]: row for row in json.loads(report.stdout)["layers"]}
    assert rows["fc.weight"]["density"] == pytest.approx(0.5) and rows["fc.weight"]["pattern"] == "2:4"
    r = cli("prune", src, "--out", tmp_path / "o.safetensors", "--json")
    assert r.exit_code == 0, r.output
    skipped = json.loads(r.stdout)["skipped_layers"]
    assert "float8_e4m3fn cannot be masked" in skipped["fc.weight"]
    assert torch.equal(load_file(str(tmp_path / "o.safetensors"))["fc.weight"].float(), w8.float())  # untouched


def test_an_empty_onnx_file_is_an_error(cli, tmp_path):
    empty = tmp_path / "m.onnx"
    empty.write_bytes(b"")
    _assert_clean_error(cli("report", empty), "m.onnx", "no graph")
