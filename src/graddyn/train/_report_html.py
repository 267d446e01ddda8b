"""One self-contained HTML page a researcher can send: what was run, the verdicts (colour-coded),
the results as HTML tables (numbers with their intervals where runs repeat a config over
seeds), every figure embedded with its caption sentence, then each run's config, versions and
final metrics.

Tables never overflow the page: a run whose trainers tag their metrics (``noise25/fit/acc``)
gets one row per tag instead of one row of every metric, a sweep one row per config, the
columns a reader looks for (accuracy, loss) first, the rest in a folded table. Tables the
experiment wrote beside its figures are picked up: ``verdict.json`` (rows of prediction,
holds, evidence, threshold) and Markdown tables in ``*.md``; a PNG that only drew the same
table (``*-verdict.png``, ``*-summary.png``) is then left out.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import statistics
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graddyn.train._store import Run

MAX_COLUMNS = 8  # metric columns of a summary table; the rest go to the folded table

_CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1150px;padding:0 1em;
 color:#222;line-height:1.45}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:13px}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums;
 white-space:nowrap}
td.holds{background:#d9f2d9;font-weight:600}td.fails{background:#f7d4d4;font-weight:600}
td.na{background:#eee;color:#555}
figure{margin:1.2em 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{font-size:13px;color:#333;max-width:900px}
pre{background:#f6f6f6;padding:.5em;font-size:12px;overflow-x:auto}
details{margin:.3em 0}summary{cursor:pointer}
"""


# ---- cells and tables ---------------------------------------------------------------------
def fmt(v: Any) -> str:
    """A table cell: floats to 4 significant digits, NaN as an en dash."""
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]],
          classes: Sequence[Sequence[str]] | None = None) -> str:
    """An HTML table (escaped), numbers right-aligned, optional CSS class per cell; a long
    metric name in a header may break after each ``/``."""
    head = "".join(f"<th>{html.escape(str(h)).replace('/', '/<wbr>')}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, c in enumerate(row):
            cls = " ".join(filter(None, ["num" if _is_num(c) or _is_interval(c) else "",
                                         classes[i][j] if classes else ""]))
            attr = f' class="{cls}"' if cls else ""
            cells.append(f"<td{attr}>{html.escape(fmt(c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(body)}</table></div>'


def _is_interval(c: Any) -> bool:
    return isinstance(c, str) and " ± " in c


def interval(values: Sequence[float]) -> Any:
    """One value as is; several (seeds) as ``mean ± half-width`` of the 95 % t-interval."""
    vals = [v for v in values if not math.isnan(v)]
    if len(vals) <= 1:
        return vals[0] if vals else float("nan")
    from scipy import stats

    half = stats.t.ppf(0.975, len(vals) - 1) * statistics.stdev(vals) / math.sqrt(len(vals))
    return f"{statistics.fmean(vals):.4g} ± {half:.2g} (n={len(vals)})"


def headline_metrics(latest: Sequence[dict[str, Any]], most: int = MAX_COLUMNS) -> list[str]:
    """The final metrics to put in a summary of several runs: those every run has, accuracy
    and loss first (the columns a reader looks for), then by name."""
    common = set.intersection(*(set(lat) for lat in latest)) if latest else set()

    def rank(name: str) -> tuple[int, str]:
        leaf = name.split("/", 1)[-1] if name.count("/") > 1 else name
        first = ("test/acc", "train/acc", "test/loss", "train/loss")
        known = first.index(leaf) if leaf in first else None
        count = name.rsplit("/", 1)[-1].startswith("num_")  # bookkeeping, not a result
        return (known if known is not None else 4 + ("acc" not in name) + 2 * count, name)

    return sorted(common, key=rank)[:most]


# ---- summaries ----------------------------------------------------------------------------
def _tags(latest: dict[str, tuple[int, float]]) -> dict[str, dict[str, float]]:
    """``{tag: {metric: value}}`` when the metric names are ``<tag>/<family>/<key>`` for
    several tags (one trainer per config inside one run); {} otherwise."""
    out: dict[str, dict[str, float]] = {}
    for name, (_, value) in latest.items():
        if name.count("/") >= 2:
            tag, rest = name.split("/", 1)
            out.setdefault(tag, {})[rest] = value
    return out if len(out) >= 2 else {}


def run_summary(run: Run) -> str:
    """Final values of one run: one row per tag (config) when its metrics are tagged."""
    latest = run.latest()
    tags = _tags(latest)
    if not tags:
        names = headline_metrics([latest], most=len(latest))
        return table(["metric", "step", "final value"], [(n, *latest[n]) for n in names])
    cols = headline_metrics(list(tags.values()), most=6)
    rows = [[tag, *[tags[tag].get(c, float("nan")) for c in cols]]
            for tag in sorted(tags, key=_natural)]
    return table(["config", *cols], rows)


def _natural(text: str) -> list[Any]:
    """Sort key that puts noise5 before noise25."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def sweep_summary(runs: Sequence[Run]) -> str:
    """One row per config (runs that differ only in ``seed`` are pooled: mean ± interval);
    columns: the config keys that vary, then the headline final metrics."""
    configs = [run.config for run in runs]
    keys = sorted({k for c in configs for k in c} - {"seed"})
    varying = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
    latest = [run.latest() for run in runs]
    metrics = headline_metrics(latest)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(json.dumps([c.get(k) for k in varying]), []).append(i)
    rows = []
    for members in groups.values():
        first = members[0]
        status = ", ".join(sorted({runs[i].status for i in members}))
        # the varying keys name a row; long run names are listed under "Runs"
        name = [] if varying else [runs[first].name]
        seeds = [f"{len(members)}"] if len(runs) > len(groups) else []
        rows.append([*name, *[fmt_config(configs[first].get(k)) for k in varying], *seeds,
                     status, *[interval([latest[i][m][1] for i in members]) for m in metrics]])
    header = [*([] if varying else ["run"]), *varying,
              *(["seeds"] if len(runs) > len(groups) else []), "status", *metrics]
    return table(header, rows)


def fmt_config(v: Any) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


# ---- tables the experiment wrote ----------------------------------------------------------
_VERDICT_CELL = {"holds": ("holds", "holds"), "fails": ("fails", "fails"),
                 "inconclusive": ("inconclusive", "na"), "n/a": ("not testable", "na"),
                 True: ("holds", "holds"), False: ("fails", "fails"),
                 None: ("not testable", "na")}


def verdict_table(data: Any) -> str:
    """Prediction / verdict / evidence / rule, the verdict cell green (holds), red (fails) or
    grey (inconclusive, not testable); above it the statistical rule and its parameters.
    ``data``: a ``verdict.json`` ({"rule", "parameters", "rows"}; rows with a ``verdict``
    word), or an older list of rows with ``holds`` true/false/null."""
    rows = data.get("rows", []) if isinstance(data, dict) else data
    head = ""
    if isinstance(data, dict) and data.get("rule"):
        params = "; ".join(f"{k}: {v}" for k, v in data.get("parameters", {}).items())
        head = (f"<p class='rule'>{html.escape(str(data['rule']))}</p>"
                + (f"<p class='rule'>{html.escape(params)}</p>" if params else ""))
    body, classes = [], []
    for r in rows:
        text, cls = _VERDICT_CELL.get(r.get("verdict", r.get("holds")), ("?", "na"))
        body.append([r.get("prediction", ""), text, r.get("evidence", ""),
                     r.get("rule", r.get("threshold", ""))])
        classes.append(["", cls, "", ""])
    return head + table(["prediction", "verdict", "evidence", "rule"], body, classes)


def markdown_tables(text: str) -> list[str]:
    """Every Markdown table (``| a | b |`` lines) of ``text`` as an HTML table."""
    out, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.strip().startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            rows = [r for r in block[1:] if not all(set(c) <= set("-: ") for c in r)]
            out.append(table(block[0], [[_number(c) for c in r] for r in rows]))
            block = []
    return out


def _number(cell: str) -> Any:
    try:
        return float(cell) if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", cell) else cell
    except ValueError:
        return cell


def experiment_tables(folder: Path) -> tuple[list[str], set[str]]:
    """(HTML sections, stems they replace) from ``verdict.json`` and ``*.md`` in ``folder``."""
    parts, stems = [], set()
    verdicts = folder / "verdict.json"
    if verdicts.is_file():
        parts.append("<h2>Verdicts</h2>" + verdict_table(json.loads(verdicts.read_text())))
        stems.add("verdict")
    for md in sorted(folder.glob("*.md")):
        if md.stem in stems:
            continue
        found = markdown_tables(md.read_text())
        if found:
            title = md.stem.replace("_", " ").replace("-", " ").capitalize()
            parts.append(f"<h2>{html.escape(title)}</h2>" + "".join(found))
            stems.add(md.stem)
    return parts, stems


# ---- figures ------------------------------------------------------------------------------
def png_caption(path: Path) -> str | None:
    """The ``Description`` text chunk of a PNG (what ``save_figure`` wrote), if any."""
    data = Path(path).read_bytes()
    pos = 8
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and body.startswith(b"Description\0"):
            return body.split(b"\0", 1)[1].decode("latin-1")
        if kind == b"zTXt" and body.startswith(b"Description\0"):
            return zlib.decompress(body.split(b"\0", 1)[1][1:]).decode("latin-1")
        if kind == b"iTXt" and body.startswith(b"Description\0"):
            return body.split(b"\0", 5)[-1].decode("utf-8")
        if kind == b"IEND":
            break
        pos += 12 + length
    return None


def figure(path: Path, number: int) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    caption = png_caption(path) or Path(path).stem.replace("_", " ").replace("-", " ")
    text = html.escape(caption)
    return (f'<figure><img alt="{text}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>Figure {number}.</b> {text}</figcaption></figure>")


# ---- the page -----------------------------------------------------------------------------
def _run_details(run: Run) -> str:
    meta = {k: run.get_meta(k) for k in ("experiment", "status", "seed", "git_sha",
                                          "created", "finished", "error")}
    latest = run.latest()
    return (
        f"<details><summary>{html.escape(run.name)} ({html.escape(str(meta['status']))})"
        "</summary>"
        + table(["field", "value"], [(k, str(v)) for k, v in meta.items() if v is not None])
        + "<h4>config</h4><pre>" + html.escape(json.dumps(run.config, indent=1)) + "</pre>"
        + "<h4>versions</h4>" + table(["package", "version"],
                                     sorted((run.get_meta("versions") or {}).items()))
        + "<h4>all final metrics</h4>" + table(["metric", "step", "value"],
                                              [(n, s, v) for n, (s, v) in latest.items()])
        + "</details>"
    )


def write_html_report(
    path: Path, title: str, images: Sequence[Path], runs: Sequence[Run], notes: str = ""
) -> Path:
    """The page: ``notes`` (HTML), the verdicts and tables the experiment wrote beside
    ``path``, a summary of ``runs`` (per config), every image with its caption, then each
    run's config, seed, versions, SHA and final metrics."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tables, replaced = experiment_tables(path.parent)
    shown = [p for p in images
             if not any(Path(p).stem == s or Path(p).stem.endswith(f"-{s}") for s in replaced)]
    if len(runs) == 1:
        summary = "<h2>Final values</h2>" + run_summary(runs[0])
    else:
        summary = f"<h2>Summary of the {len(runs)} runs</h2>" + sweep_summary(runs)
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
        notes, *tables, summary,
        "<h2>Figures</h2>" if shown else "",
        *[figure(p, i) for i, p in enumerate(shown, start=1)],
        "<h2>Runs</h2>", *[_run_details(r) for r in runs],
        "</body></html>",
    ]
    path.write_text("\n".join(parts), encoding="utf-8")
    return path
