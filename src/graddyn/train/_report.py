"""Report figures without pyplot's global state: ``new_figure``, ``save_figure`` (a caption
sentence in every PNG, legends beside the panels, labelled axes) and ``plot_histories``.

Figures are ``matplotlib.figure.Figure`` objects drawn with the Agg canvas, so reports work
headless and in worker processes. The HTML page is ``_report_html.write_html_report``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from graddyn.train._store import Run


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (4.0, 3.0)) -> tuple:
    """``(fig, axes)`` with ``size`` per panel; axes is always a 2-D array (nrows, ncols)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Figure, path: Path, caption: str | None = None) -> Path:
    """Write ``fig`` as PNG (Agg) to ``path`` and release it (closing it if pyplot made it).

    The PNG carries a caption sentence (its ``Description`` text chunk, read back by the HTML
    report): ``caption``, or one written from the figure (titles, axis labels, legend). Before
    saving, legends drawn inside a panel move beside it, so they never cover a curve."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fig.canvas is None or type(fig.canvas).__name__ == "FigureCanvasBase":
        FigureCanvasAgg(fig)
    _tidy(fig)
    text = caption or describe_figure(fig)
    fig.savefig(path, dpi=110, format="png", metadata={"Description": text})
    import sys

    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close(fig)
    return path


def _panels(fig: Figure) -> list[Any]:
    """The visible axes that show data (not colorbars or blank table panels)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.axison
            and (ax.lines or ax.collections or ax.patches or ax.images)]


def _tidy(fig: Figure) -> None:
    for ax in _panels(fig):
        leg = ax.get_legend()
        if leg is not None and getattr(leg, "_bbox_to_anchor", None) is None:
            handles, labels = leg.legend_handles, [t.get_text() for t in leg.get_texts()]
            title = leg.get_title().get_text() or None
            size = leg.get_texts()[0].get_fontsize() if labels else 7
            ax.legend(handles, labels, title=title, fontsize=size, loc="upper left",
                      bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def describe_figure(fig: Figure) -> str:
    """A caption sentence from the figure itself: its title, what is plotted against what
    (the panels' titles when there are several), and what the lines are."""
    sup = fig._suptitle.get_text() if getattr(fig, "_suptitle", None) else ""
    panels = _panels(fig)

    def uniq(items: list[str]) -> list[str]:
        return list(dict.fromkeys(" ".join(i.split()) for i in items if i))

    ys = uniq([ax.get_ylabel() for ax in panels]) or uniq([ax.get_title() for ax in panels])
    xs = uniq([ax.get_xlabel() for ax in panels])
    titles = uniq([ax.get_title() for ax in panels]) if len(panels) > 1 else []
    what = " / ".join(ys[:4]) or "values"
    text = what + (f" against {' / '.join(xs[:2])}" if xs else "")
    if titles and titles != ys:
        text += " (panels: " + "; ".join(titles[:6]) + ("; ..." if len(titles) > 6 else "") + ")"
    text = f"{sup}: {text}" if sup else text[0].upper() + text[1:]
    labels = uniq([t.get_text() for ax in panels if ax.get_legend() is not None
                   for t in ax.get_legend().get_texts()])
    if labels:
        text += ". Lines: " + ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
    return text + "."


def plot_histories(runs: Sequence[Run], names: Sequence[str], path: Path, ncols: int = 3) -> Path:
    """One panel per metric name, one line per run (labelled by run name); the y-axis is
    labelled with the metric, the legend sits beside the first panel."""
    ncols = max(1, min(ncols, len(names)))
    nrows = max(1, -(-len(names) // ncols))
    fig, axes = new_figure(nrows, ncols)
    for ax, name in zip(axes.flat, names):
        for run in runs:
            steps, vals = run.history(name)
            if len(steps):
                ax.plot(steps, vals, label=run.name, marker="." if len(steps) < 30 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel(name.rsplit("/", 1)[-1], fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    if len(runs) > 1 and len(runs) <= 12:
        axes.flat[0].legend(fontsize=6)
    caption = (f"Metrics over training steps ({', '.join(names[:6])}"
               + (", ..." if len(names) > 6 else "") + ")"
               + (f", one line per run ({len(runs)} runs)." if len(runs) > 1 else "."))
    return save_figure(fig, path, caption=caption)
