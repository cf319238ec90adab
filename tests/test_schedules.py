"""Schedules against the worked examples of methods.md §2-3 (hand-written expectations)."""

import math

import pytest

from nmcli.errors import NMSparseError
from nmcli.nm import NMPattern, parse_pattern
from nmcli.methods.schedules import (
    Phases,
    alpha,
    decay_rate,
    geometric_stages,
    pattern_for_layer,
    stage_bounds,
    stage_index,
    stepwise_stages,
)


def _names(stages):
    return " ".join(map(str, stages))


@pytest.mark.parametrize(
    "target,expected",
    [
        ("1:4", "3:4 2:4 1:4"),
        ("2:4", "3:4 2:4"),
        ("1:8", "7:8 4:8 2:8 1:8"),
        ("1:16", "15:16 8:16 4:16 2:16 1:16"),
        ("1:32", "31:32 16:32 8:32 4:32 2:32 1:32"),
        ("3:4", "3:4"),
    ],
)
def test_stepwise_stages(target, expected):
    assert _names(stepwise_stages(parse_pattern(target))) == expected


@pytest.mark.parametrize("target,expected", [("1:8", "8:64 4:32 2:16 1:8"), ("2:4", "16:32 8:16 4:8 2:4")])
def test_geometric_stages(target, expected):
    assert _names(geometric_stages(parse_pattern(target))) == expected


def test_target_is_the_last_frame_inside_the_decay_phase():
    # 1:16 -> five equal frames 15:16, 8:16, 4:16, 2:16, 1:16 over a 100-step decay phase
    stages = stepwise_stages(NMPattern(1, 16))
    seen = [str(stages[stage_index(t, 100, len(stages))]) for t in range(100)]
    assert seen[0] == "15:16" and seen[19] == "15:16" and seen[20] == "8:16"
    assert seen[79] == "2:16" and seen[80] == "1:16" and seen[99] == "1:16"
    assert [seen.count(str(s)) for s in stages] == [20] * 5
    assert stage_index(100, 100, 5) == 4  # fine-tune keeps the target
    assert [stage_bounds(i, 100, 5) for i in range(5)] == [(0, 20), (20, 40), (40, 60), (60, 80), (80, 100)]


def test_layer_that_cannot_take_a_large_group_starts_at_the_largest_it_can():
    stages = geometric_stages(NMPattern(1, 8))  # 8:64 4:32 2:16 1:8
    assert pattern_for_layer(stages, 0, 192) == NMPattern(8, 64)
    assert pattern_for_layer(stages, 0, 96) == NMPattern(4, 32)
    assert pattern_for_layer(stages, 0, 48) == NMPattern(2, 16)
    assert pattern_for_layer(stages, 2, 96) == NMPattern(2, 16)


def test_phases_and_clock():
    p = Phases.from_fractions(100, dense=0.1, finetune=0.2)
    assert (p.dense_end, p.finetune_start, p.decay_length) == (10, 80, 70)
    assert [p.phase(s) for s in (0, 9, 10, 79, 80, 99)] == ["dense", "dense", "decay", "decay", "finetune", "finetune"]
    assert p.clock(10) == 0  # t = 0 at the first decay step (no offset bug)
    with pytest.raises(NMSparseError, match="sum to at most 1"):
        Phases.from_fractions(100, dense=0.7, finetune=0.5)


def test_alpha_schedules():
    assert alpha("linear", 0, rate=2e-4) == 1.0
    assert alpha("linear", 2500, rate=2e-4) == pytest.approx(0.5)
    assert alpha("linear", 5000, rate=2e-4) == 0.0 and alpha("linear", 9000, rate=2e-4) == 0.0
    assert alpha("exponential", 10000, rate=1e-4) == pytest.approx(math.exp(-1))
    # stepped (Google JAX variant): alpha_k = max(0, 1 - k w), k = mask updates every `interval` steps
    assert [alpha("stepped", t, interval=10, step_size=0.25) for t in (0, 9, 10, 25, 39, 40, 100)] == [
        1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0
    ]


def test_rate_derived_from_run_length():
    c = decay_rate("linear", 1000, reach_at=0.5)
    assert alpha("linear", 500, rate=c) == pytest.approx(0.0) and alpha("linear", 250, rate=c) == pytest.approx(0.5)
    c = decay_rate("exponential", 1000, reach_at=0.8)
    assert alpha("exponential", 800, rate=c) == pytest.approx(0.01)
