import dataclasses

import pytest
import yaml

from nmcli.errors import NMSparseError
from nmcli.methods.recipes import builtin_names, from_dict, load_recipe, to_dict

REQUIRED = {"dense", "ste", "sr-ste", "fixed-mask", "mdgf-linear", "mdgf-exponential", "sdgf-stepwise", "sdgf-geometric"}


def test_builtins_ship_with_the_package_and_round_trip():
    assert REQUIRED <= set(builtin_names())
    for name in builtin_names():
        recipe = load_recipe(name)
        assert from_dict(yaml.safe_load(recipe.to_yaml()), "again") == dataclasses.replace(recipe, source="again")


@pytest.mark.parametrize(
    "change,message",
    [
        ({"colour": "red"}, "colour: unknown key"),
        ({"method": "magic"}, "method: 'magic' is not one of"),
        ({"pattern": 124}, 'pattern: write patterns as quoted strings, e.g. "2:4" (YAML read 124)'),
        ({"pattern": "5:4"}, "pattern: invalid N:M pattern '5:4'"),
        ({"phases": {"dense": 0.8, "finetune": 0.5}}, "phases: dense (0.8) + finetune (0.5) must be at most 1"),
        ({"phases": {"dense": "a lot"}}, "phases.dense: expected a number"),
        ({"phases": {"warmup": 0.1}}, "phases.warmup: unknown key"),
        ({"mask_decay": {"schedule": "linear", "rate": 1e-3}}, "mask_decay: only MDGF recipes decay the mask"),
        ({"training": {"epochs": 0}}, "training.epochs: 0 is outside"),
        ({"training": {"epochs": 2.5}}, "training.epochs: expected an integer"),
        ({"targets": {"include": "fc1"}}, "targets.include: expected a list of strings"),
    ],
)
def test_validation_names_file_and_key(tmp_path, change, message):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "method": "ste", "pattern": "2:4", **change}))
    with pytest.raises(NMSparseError) as info:
        load_recipe(str(path))
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_unquoted_pattern_in_yaml_is_caught(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nmethod: ste\npattern: 2:4\n")  # YAML 1.1 reads 2:4 as the base-60 integer 124
    with pytest.raises(NMSparseError, match="quoted strings"):
        load_recipe(str(path))


def test_mdgf_needs_a_rate_or_reach_at(tmp_path):
    base = {"name": "m", "method": "mdgf", "mask_decay": {"schedule": "linear"}}
    with pytest.raises(NMSparseError, match="exactly one of rate"):
        from_dict(base, "m.yaml")
    with pytest.raises(NMSparseError, match="needs step_size"):
        from_dict({**base, "mask_decay": {"schedule": "stepped"}}, "m.yaml")
    assert from_dict({**base, "mask_decay": {"schedule": "stepped", "step_size": 0.1, "interval": 5}}, "m").mask_decay.interval == 5


def test_sr_ste_with_decay_only_when_asked():
    plain = load_recipe("mdgf-linear")
    assert plain.sr_ste_lambda is None
    combined = from_dict({**to_dict(plain), "sr_ste": {"lambda": 1e-4}}, "c.yaml")
    assert combined.sr_ste_lambda == 1e-4
    with pytest.raises(NMSparseError, match="takes no SR-STE term"):
        from_dict({"name": "s", "method": "ste", "sr_ste": {"lambda": 1e-4}}, "s.yaml")


# Which sections each method takes (methods.md §2-3, §10), written out by hand: mask decay is MDGF's, structure decay
# SDGF's, the SR-STE term is sr-ste's own or added to a decay, adapters train on every sparse method's mask but
# SR-STE's (its pull acts on the frozen base).
SECTIONS = {
    "mask_decay": {"mask_decay": {"schedule": "linear", "rate": 1e-3}},
    "structure_decay": {"structure_decay": {"schedule": "stepwise"}},
    "sr_ste": {"sr_ste": {"lambda": 1e-4}},
    "lora": {"lora": {"rank": 4}},
}
ACCEPTS = {
    "dense": set(),
    "ste": {"lora"},
    "sr-ste": {"sr_ste"},
    "fixed-mask": {"lora"},
    "mdgf": {"mask_decay", "sr_ste", "lora"},
    "sdgf": {"structure_decay", "sr_ste", "lora"},
    "mdgf+sdgf": {"mask_decay", "structure_decay", "sr_ste", "lora"},
}


@pytest.mark.parametrize("method", sorted(ACCEPTS))
@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_each_method_takes_exactly_its_sections(method, section):
    needed = {"mask_decay": SECTIONS["mask_decay"]["mask_decay"]} if "mdgf" in method else {}
    data = {"name": "x", "method": method, "pattern": "2:4", **needed, **SECTIONS[section]}
    if section in ACCEPTS[method]:
        assert from_dict(data, "x.yaml").method.value == method
    else:
        with pytest.raises(NMSparseError, match=f"x.yaml: {section}"):
            from_dict(data, "x.yaml")


def test_overrides_are_validated():
    assert load_recipe("sr-ste").with_overrides(pattern="1:16", epochs=7, lr=0.1).training["epochs"] == 7
    with pytest.raises(NMSparseError, match="unknown recipe 'nope'"):
        load_recipe("nope")
    with pytest.raises(NMSparseError, match="recipe file not found"):
        load_recipe("missing.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    with pytest.raises(NMSparseError, match="not valid YAML"):
        load_recipe(str(path))


MDGF = {"method": "mdgf", "mask_decay": {"schedule": "linear", "reach_at": 0.8}}
SDGF = {"method": "sdgf", "structure_decay": {"schedule": "custom"}}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"optimizer": {"lr": float("inf")}}, "optimizer.lr: inf is not a finite number"),
        ({"optimizer": {"lr": float("nan")}}, "optimizer.lr: nan is not a finite number"),
        ({"optimizer": {"lr": -1e-3}}, "optimizer.lr: -0.001 is outside"),
        ({"optimizer": {"name": "adamww"}}, "optimizer.name: 'adamww' is not a timm optimizer"),
        ({"optimizer": {"betas": [0.9]}}, "optimizer.betas: expected two numbers"),
        ({"optimizer": {"momentum": 1.5}}, "optimizer.momentum: 1.5 is outside"),
        ({"scheduler": {"name": "plateau"}}, "scheduler.name: 'plateau' is not one of"),
        ({"scheduler": {"min_lr": float("nan")}}, "scheduler.min_lr: nan is not a finite number"),
        ({"training": {"epochs": 10**9}}, "training.epochs: 1000000000 is outside"),
        ({"training": {"bf16": "yes"}}, "training.bf16: expected true or false"),
        ({**MDGF, "mask_decay": {"schedule": "linear", "reach_at": "0.8"}}, "mask_decay.reach_at: expected a number"),
        ({**MDGF, "mask_decay": {"schedule": "stepped", "step_size": 0.1, "interval": "3"}}, "mask_decay.interval: expected an integer"),
        ({**MDGF, "mask_decay": {"schedule": "stepped", "step_size": 0.1, "rate": 1e-3}}, "mask_decay.rate: the stepped schedule takes step_size"),
        ({**MDGF, "mask_decay": {"schedule": "linear", "reach_at": 0.8, "step_size": 0.1}}, "mask_decay: step_size and interval belong to the stepped"),
        ({**SDGF, "structure_decay": {"schedule": "custom", "stages": ["2:4", "3:4"]}}, "structure_decay.stages: stages must go from dense"),
        ({**SDGF, "pattern": "2:4", "structure_decay": {"schedule": "custom", "stages": ["4:4", "1:4"]}}, "structure_decay.stages: stages must go from dense"),
    ],
)
def test_every_value_is_checked_when_the_recipe_is_loaded(tmp_path, change, message):
    path = tmp_path / "my.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "method": "ste", "pattern": "2:4", **change}))
    with pytest.raises(NMSparseError) as info:
        load_recipe(str(path))
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)


def test_a_well_ordered_custom_stage_list_is_accepted(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "pattern": "1:8", **SDGF,
                                    "structure_decay": {"schedule": "custom", "stages": ["8:8", "4:8", "2:8"]}}))
    assert load_recipe(str(path)).structure_decay.stages == ("8:8", "4:8", "2:8")
