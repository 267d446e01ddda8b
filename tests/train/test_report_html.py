"""The HTML report renders as a researcher would send it: verdicts colour-coded, per-config
tables, seeds pooled with intervals, every figure with its caption sentence, legends beside
the panels (checked on the written page and PNGs; no browser needed)."""

from __future__ import annotations

import json
import re

import pytest

from graddyn.train import RunStore, new_figure, save_figure, write_html_report
from graddyn.train._report_html import interval, markdown_tables, png_caption


def _tagged_run(store):
    run = store.create("ln", {"noise_levels": [0.0, 0.5]}, seed=0, experiment="x")
    for tag, acc in (("noise0", 0.9), ("noise50", 0.6)):
        for s in (0, 10):
            run.log(s, {f"{tag}/fit/test_acc": acc * s / 10, f"{tag}/fit/train_loss": 1.0 - s / 20,
                        f"{tag}/batch_coherence/alpha": 0.01, f"{tag}/counts/num_x": 5.0})
    return run


def test_page_has_verdicts_tables_captions_and_no_duplicate_table_images(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = _tagged_run(store)
    out = tmp_path / "report"
    out.mkdir()
    (out / "verdict.json").write_text(json.dumps([
        {"prediction": "more noise is slower", "holds": True, "evidence": "0.9 vs 0.6",
         "threshold": "strict"},
        {"prediction": "f_p beats null", "holds": False, "evidence": "no", "threshold": "0.05"},
        {"prediction": "peak then fall", "holds": None, "evidence": "-", "threshold": "-"}]))
    (out / "verdict.md").write_text("| a | b |\n|---|---|\n| x | y |\n")
    (out / "summary.md").write_text("| c | acc |\n|---|---|\n| 0 | 0.91 |\n| 4 | 0.85 |\n")
    fig, axes = new_figure(1, 2)
    for ax, title in zip(axes[0], ("training accuracy", "test accuracy")):
        ax.plot([0, 1], [0, 1], label="0 % noise")
        ax.plot([0, 1], [1, 0], label="50 % noise")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("accuracy")
        ax.legend()  # inside the panel: moved beside it when saved
    fig.suptitle("label noise")
    curves = save_figure(fig, out / "x-curves.png")
    assert not any(getattr(ax.get_legend(), "_bbox_to_anchor", None) is None for ax in axes[0])
    table_png = save_figure(new_figure()[0], out / "x-verdict.png", caption="the same table")
    page = write_html_report(out / "report.html", "t", [curves, table_png], [run]).read_text()
    # verdicts: one coloured cell each
    assert re.search(r'<td class="holds">holds</td>', page)
    assert '<td class="fails">fails</td>' in page and '<td class="na">not testable</td>' in page
    # the experiment's Markdown table, as HTML with numbers right-aligned
    assert "<h2>Summary</h2>" in page and '<td class="num">0.91</td>' in page
    # one row per tag (config), accuracy first, bookkeeping counts last
    head = re.search(r"<th>config</th>(.*?)</tr>", page).group(1)
    assert head.index("test_acc") < head.index("train_loss") < head.index("num_x")
    assert "<td>noise0</td>" in page and "<td>noise50</td>" in page
    # the figure, with its caption sentence; the PNG that only drew the verdict table is gone
    assert page.count("<figure>") == 1 and "the same table" not in page
    caption = ("label noise: accuracy against step (panels: training accuracy; test "
               "accuracy). Lines: 0 % noise, 50 % noise.")
    assert png_caption(curves) == caption and f"Figure 1.</b> {caption}" in page


def test_seeds_of_one_config_are_pooled_with_an_interval(tmp_path):
    store = RunStore(tmp_path)
    runs = []
    for c in (0, 4):
        for seed, acc in ((0, 0.80), (1, 0.84), (2, 0.82)):
            run = store.create(f"c{c}s{seed}", {"c": c, "seed": seed}, seed=seed,
                               experiment="x")
            run.log(5, {"test/acc": acc - 0.1 * (c == 4), "train/loss": 0.5})
            runs.append(run)
    page = write_html_report(tmp_path / "r.html", "t", [], runs).read_text()
    head = re.search(r"<tr><th>c</th>(.*?)</tr>", page).group(1)
    assert "<th>seeds</th>" in head and head.index("test/<wbr>acc") < head.index("train/")
    assert f"<td class=\"num\">{interval([0.8, 0.84, 0.82])}</td>" in page
    assert interval([0.8, 0.84, 0.82]) == "0.82 ± 0.05 (n=3)"
    assert interval([0.5]) == 0.5 and interval([]) != interval([])  # NaN: nothing to pool


def test_markdown_tables_and_uncaptioned_pngs():
    (tab,) = markdown_tables("text\n| a | b |\n|:-|-:|\n| 1 | x |\n\nmore")
    assert "<th>a</th>" in tab and '<td class="num">1</td>' in tab and "<td>x</td>" in tab
    assert markdown_tables("no table here") == []


def test_plot_histories_labels_its_axes(tmp_path):
    from graddyn.train import plot_histories

    store = RunStore(tmp_path)
    run = store.create("r", {}, experiment="x")
    run.log(0, {"train/loss": 1.0})
    run.log(1, {"train/loss": 0.5})
    png = plot_histories([run], ["train/loss"], tmp_path / "m.png")
    assert png_caption(png) == "Metrics over training steps (train/loss)."
    with pytest.raises(FileNotFoundError):
        png_caption(tmp_path / "missing.png")
