import json

import numpy as np
import pytest

from graddyn.experiments._stats import RULE
from graddyn.experiments._verdicts import (
    Verdict,
    end_value,
    final_value,
    mean_over_steps,
    not_tested,
    robust_peak,
    verdict_markdown,
    write_verdicts,
)


def test_mean_over_steps_weights_by_step_spacing():
    # uneven spacing: the plain mean of the values (2/3) would be wrong
    assert mean_over_steps((np.array([0, 1, 3]), np.array([0.0, 1.0, 1.0]))) == 2.5 / 3
    assert mean_over_steps((np.array([5]), np.array([0.4]))) == 0.4
    assert np.isnan(mean_over_steps((np.array([]), np.array([]))))


def test_end_and_peak_ignore_one_transient_evaluation():
    steps = np.arange(8)
    collapse_at_end = (steps, np.array([0.2, 0.6, 0.8, 0.85, 0.86, 0.85, 0.86, 0.55]))
    assert final_value(collapse_at_end) == 0.55  # the last evaluation alone
    assert end_value(collapse_at_end) == 0.85  # median of the last three
    spike = (steps, np.array([0.2, 0.95, 0.3, 0.4, 0.5, 0.5, 0.5, 0.5]))
    assert robust_peak(spike) == 0.5
    assert robust_peak((steps[:2], np.array([0.1, 0.3]))) == pytest.approx(0.2)
    assert np.isnan(end_value(None)) and np.isnan(robust_peak(None))
    assert np.isnan(final_value(None))


def test_verdict_file_states_the_rule_and_parameters(tmp_path):
    rows = [Verdict("p", "holds", "e", "t"), not_tested("q", "needs more")]
    md = verdict_markdown(rows, {"seeds": "0,1,2"})
    assert RULE in md and "seeds = 0,1,2" in md
    assert "| p | holds | e | t |" in md and "| q | n/a | needs more |  |" in md
    path = write_verdicts(tmp_path, rows, {"seeds": "0,1,2"})
    data = json.loads((tmp_path / "verdict.json").read_text())
    assert path.read_text() == md and data["rule"] == RULE and data["rows"][0]["verdict"] == "holds"


def test_verdict_word_is_checked():
    with pytest.raises(ValueError, match="verdict must be one of"):
        Verdict("p", "supported", "e", "t")


def test_departures_compare_tuples_and_lists_alike():
    from dataclasses import dataclass

    from graddyn.experiments._verdicts import departures

    @dataclass(frozen=True)
    class C:
        seeds: tuple = (0, 1, 2)
        steps: int = 10

    assert departures({"seeds": (0, 1, 2), "steps": 10}, C()) == "none"
    assert departures({"seeds": [0], "steps": 10}, C()) == "seeds [0] (default [0, 1, 2])"
