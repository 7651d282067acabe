"""Learning-rate schedules: the host's DSL (modules/textual_inversion/learn_schedule.py) and named ones."""

from __future__ import annotations

import math

import pytest

from lib_sdtrain.core.errors import ConfigError
from lib_sdtrain.core.options.lr_schedule import (
    ConstantWithWarmupSchedule,
    CosineSchedule,
    Schedule,
    StepSchedule,
    make_schedule,
    parse_schedule,
)

HOST_EXAMPLE = "0.005:100, 1e-3:1000, 1e-5"


def test_host_example_parses_and_steps():
    assert parse_schedule(HOST_EXAMPLE, 2000) == [(0.005, 100), (1e-3, 1000), (1e-5, 2000)]
    s = make_schedule("dsl", HOST_EXAMPLE, 2000, 0)
    assert isinstance(s, Schedule)
    # "0.005 until step 100": steps 0..99 use it; the host switches when step >= end_step.
    assert [s.value(n) for n in (0, 99, 100, 999, 1000, 1999)] == [0.005, 0.005, 1e-3, 1e-3, 1e-5, 1e-5]
    assert s.end_step == 2000
    assert not s.finished(1999) and s.finished(2000)
    assert s.segments == [(0, 100, 0.005), (100, 1000, 1e-3), (1000, 2000, 1e-5)]


def test_bare_rate_runs_to_max_and_stops_parsing():
    assert parse_schedule("0.01", 500) == [(0.01, 500)]
    # Everything after a bare rate is ignored, even garbage (host returns at once).
    assert parse_schedule(" 2e-4 , junk", 500) == [(2e-4, 500)]
    s = make_schedule("dsl", "0.01", 500)
    assert s.value(0) == s.value(499) == 0.01 and s.end_step == 500


def test_numbers_are_accepted_as_schedules():
    assert parse_schedule(0.005, 10) == [(0.005, 10)]


def test_minus_one_means_max_steps_and_stops():
    assert parse_schedule("0.1:10, 0.2:-1, 0.3:20", 100) == [(0.1, 10), (0.2, 100)]
    s = StepSchedule.parse("0.1:10, 0.2:-1", 100)
    assert (s.value(9), s.value(10), s.value(99), s.end_step) == (0.1, 0.2, 0.2, 100)


def test_step_beyond_max_is_clipped_and_stops_parsing():
    assert parse_schedule("0.1:50, 0.2:150, 0.3:200, junk", 100) == [(0.1, 50), (0.2, 100)]
    # STEP == max_steps does not stop parsing: the next entry is read and clipped too (host quirk).
    assert parse_schedule("0.1:100, 0.2:200", 100) == [(0.1, 100), (0.2, 100)]


def test_repeated_end_step_overshoots_like_the_host():
    # The host advances one entry per apply() call: the clipped duplicate still gets one step,
    # so training ends at 101 with 100 max steps (with one apply per step, gradient_step 1).
    s = StepSchedule.parse("0.1:100, 0.2:200", 100)
    assert (s.value(99), s.value(100), s.end_step) == (0.1, 0.2, 101)
    # With two micro-batches per step both advances happen within step 100: training stops there.
    s2 = StepSchedule.parse("0.1:100, 0.2:200", 100, gradient_step=2)
    assert (s2.value(99), s2.end_step) == (0.1, 100)


def test_schedule_ending_before_max_steps_finishes_early():
    s = make_schedule("dsl", "0.01:50, 0.001:80", 1000)
    assert (s.value(49), s.value(50), s.value(79)) == (0.01, 0.001, 0.001)
    assert s.end_step == 80 and s.finished(80) and not s.finished(79)


def test_resume_drops_passed_entries():
    assert parse_schedule(HOST_EXAMPLE, 2000, cur_step=100) == [(1e-3, 1000), (1e-5, 2000)]
    assert parse_schedule(HOST_EXAMPLE, 2000, cur_step=1500) == [(1e-5, 2000)]
    s = make_schedule("dsl", HOST_EXAMPLE, 2000, cur_step=500)
    assert (s.value(500), s.value(999), s.value(1000), s.end_step) == (1e-3, 1e-3, 1e-5, 2000)
    # A passed entry's rate is never checked (host), but an empty result is an error.
    assert parse_schedule("bad:5, 0.1", 100, cur_step=10) == [(0.1, 100)]
    with pytest.raises(ConfigError, match="resumes"):
        parse_schedule("0.1:10, 0.2:20", 100, cur_step=30)


def test_whitespace_entries_skipped():
    assert parse_schedule(" , 0.1:10 ,,  , 0.2", 50) == [(0.1, 10), (0.2, 50)]


@pytest.mark.parametrize(
    "text",
    ["", "   ", " , ", "abc", "0.1:ten", "0.1:100.0", "0.1:1e3", "x:10", "nan", "0.1:10, inf:20"],
)
def test_bad_syntax_names_the_field(text):
    with pytest.raises(ConfigError) as e:
        parse_schedule(text, 100, field="clip_grad_value")
    assert e.value.field == "clip_grad_value"
    assert "RATE:STEP" in e.value.message


def test_extra_colons_read_first_part_as_bare_rate():
    assert parse_schedule("0.1:2:3, 0.5", 40) == [(0.1, 40)]


def test_gradient_step_does_not_change_ordinary_schedules():
    a = StepSchedule.parse(HOST_EXAMPLE, 2000, 37)
    b = StepSchedule.parse(HOST_EXAMPLE, 2000, 37, gradient_step=4)
    assert all(a.value(n) == b.value(n) for n in range(37, 2001)) and a.end_step == b.end_step == 2000


def test_cosine_values():
    s = make_schedule("cosine", "0.01", 100, min_lr=0.001)
    assert isinstance(s, CosineSchedule)
    assert s.value(0) == pytest.approx(0.01)
    assert s.value(50) == pytest.approx(0.0055)
    assert s.value(100) == pytest.approx(0.001)
    assert s.value(150) == pytest.approx(0.001)
    assert s.end_step == 100 and s.finished(100) and not s.finished(99)


def test_cosine_with_warmup():
    s = make_schedule("cosine", 0.01, 110, warmup_steps=10)
    assert s.value(0) == 0.0
    assert s.value(5) == pytest.approx(0.005)
    assert s.value(10) == pytest.approx(0.01)
    assert s.value(60) == pytest.approx(0.005)
    assert s.value(110) == pytest.approx(0.0, abs=1e-12)
    # Pure function of the step: resuming changes nothing.
    r = make_schedule("cosine", 0.01, 110, cur_step=60, warmup_steps=10)
    assert r.value(60) == s.value(60)


def test_constant_with_warmup():
    s = make_schedule("constant_with_warmup", "1e-3", 200, warmup_steps=4)
    assert isinstance(s, ConstantWithWarmupSchedule)
    assert [s.value(n) for n in range(6)] == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])
    assert s.value(199) == 1e-3 and s.end_step == 200
    assert make_schedule("constant_with_warmup", "1e-3", 200).value(0) == 1e-3


def test_named_schedules_reject_dsl_and_bad_values():
    with pytest.raises(ConfigError, match="dsl") as e:
        make_schedule("cosine", HOST_EXAMPLE, 100)
    assert e.value.field == "learn_rate"
    with pytest.raises(ConfigError):
        make_schedule("cosine", "fast", 100)
    with pytest.raises(ConfigError) as e:
        make_schedule("cosine", "0.1", 100, min_lr=-1.0)
    assert e.value.field == "min_lr"
    with pytest.raises(ConfigError) as e:
        make_schedule("constant_with_warmup", "0.1", 100, warmup_steps=-3)
    assert e.value.field == "warmup_steps"
    with pytest.raises(ConfigError) as e:
        make_schedule("linear", "0.1", 100)  # type: ignore[arg-type]
    assert e.value.field == "lr_schedule"
    assert math.isclose(make_schedule("dsl", "0.1", 100, warmup_steps=5).value(0), 0.1)
