"""Shared pieces of the generated verdict tables: a verdict row, curve summaries robust to one
bad evaluation, and the verdict file (the rule and its parameters, then the table). Reports
compute verdicts from the runs with the rules of ``_stats``, never hard-code them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graddyn.experiments._stats import NOT_TESTED, RULE, WORDS

Curve = tuple[np.ndarray, np.ndarray]  # (steps, values)


@dataclass(frozen=True)
class Verdict:
    """One prediction: its verdict word (``_stats.WORDS``), the numbers behind it and the
    rule (with its parameters) that turned them into the word."""

    prediction: str
    verdict: str
    evidence: str
    rule: str

    def __post_init__(self) -> None:
        if self.verdict not in WORDS:
            raise ValueError(f"verdict must be one of {', '.join(WORDS)}, got {self.verdict!r}")


def not_tested(prediction: str, why: str) -> Verdict:
    """A prediction these runs cannot test, and why."""
    return Verdict(prediction, NOT_TESTED, why, "")


def mean_over_steps(curve: Curve) -> float:
    """Step-weighted mean of a curve (trapezoid area / step span): "area under the learning
    curve", insensitive to uneven evaluation spacing; the last value for a single point; NaN
    for an empty curve.

    >>> mean_over_steps((np.array([0, 1, 3]), np.array([0.0, 1.0, 1.0])))
    0.8333333333333334
    """
    steps, vals = np.asarray(curve[0], float), np.asarray(curve[1], float)
    if len(steps) == 0:
        return float("nan")
    if len(steps) == 1 or steps[-1] == steps[0]:
        return float(vals[-1])
    return float(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def final_value(curve: Curve | None) -> float:
    """The last value of a curve; NaN when there is none."""
    return float(curve[1][-1]) if curve is not None and len(curve[1]) else float("nan")


def end_value(curve: Curve | None, window: int = 3) -> float:
    """Median of the last ``window`` values: the end of a curve, unmoved by one transient
    evaluation (a one-evaluation collapse at the end is not where training ended up).

    >>> end_value((np.arange(5), np.array([0.1, 0.8, 0.9, 0.2, 0.9])))
    0.9
    """
    if curve is None or not len(curve[1]):
        return float("nan")
    return float(np.median(np.asarray(curve[1], float)[-window:]))


def robust_peak(curve: Curve | None, window: int = 3) -> float:
    """Largest running median of ``window`` consecutive values: a peak that one spike cannot
    make (the plain maximum of noisy evaluations is biased upwards).

    >>> robust_peak((np.arange(5), np.array([0.1, 0.9, 0.2, 0.5, 0.6])))
    0.5
    """
    if curve is None or not len(curve[1]):
        return float("nan")
    v = np.asarray(curve[1], float)
    if len(v) < window:
        return float(np.median(v))
    runs = np.lib.stride_tricks.sliding_window_view(v, window)
    return float(np.max(np.median(runs, axis=1)))


def departures(config: Mapping[str, Any], default: Any) -> str:
    """The fields of a run's ``config`` (a dict) that differ from the experiment's ``default``
    config (a dataclass), ``"name = value (default d)"``; ``"none"`` when it is the default.
    A shortened run (the demo) says so in its verdict file.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class C:
    ...     steps: int = 100
    ...     lr: float = 0.1
    >>> departures({"steps": 10, "lr": 0.1}, C())
    'steps 10 (default 100)'
    """
    fields = json.loads(json.dumps(asdict(default)))
    given = json.loads(json.dumps(dict(config)))  # tuples and lists compare alike
    diffs = [f"{k} {given[k]} (default {v})" for k, v in fields.items()
             if k in given and given[k] != v]
    return ", ".join(diffs) or "none"


def verdict_markdown(rows: Sequence[Verdict], params: Mapping[str, Any] | None = None) -> str:
    """The verdict file: the rule and its parameters, then one row per prediction."""
    lines = ["**Rule.** " + RULE, ""]
    if params:
        lines += ["**Parameters.** " + "; ".join(f"{k} = {v}" for k, v in params.items()), ""]
    lines += ["| prediction | verdict | evidence (mean ± 95 % interval over seeds) | rule |",
              "|---|---|---|---|"]
    lines += ["| " + " | ".join(cell(c) for c in (r.prediction, r.verdict, r.evidence, r.rule))
              + " |" for r in rows]
    return "\n".join(lines) + "\n"


def cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (a ``|`` would end the cell).

    >>> cell("|a - b| < 0.1")
    '\\\\|a - b\\\\| < 0.1'
    """
    return str(text).replace("|", "\\|")


def write_verdicts(out_dir: Path, rows: Sequence[Verdict],
                   params: Mapping[str, Any] | None = None, stem: str = "verdict") -> Path:
    """Write ``<stem>.md`` (rule, parameters, table) and ``<stem>.json``; returns the .md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.md"
    path.write_text(verdict_markdown(rows, params))
    (out_dir / f"{stem}.json").write_text(json.dumps(
        {"rule": RULE, "parameters": dict(params or {}), "rows": [asdict(r) for r in rows]},
        indent=1, default=str))
    return path
