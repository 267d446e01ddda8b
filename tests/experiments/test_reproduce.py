"""``make reproduce``: a tiny catalogue end to end (run, report, README block), resuming, the
README markers and every raise."""

import pytest

from graddyn.experiments._reproduce import (
    Job,
    Study,
    main,
    replace_block,
    reproduce,
    strip_rule,
    studies,
)

M3 = "coherent-gradients.median-of-3"
TINY = ("dataset=digits", "n_train=100", "steps=6", "width=8", "depth=1", "seeds=0,1",
        "eval_points=2", "batch_size=20", "optimizers=sgd,rm3,ra3")
README = "# x\n\n<!-- reproduce:m3 -->\nold text\n<!-- /reproduce:m3 -->\n\nafter\n"


def _catalogue():
    jobs = (Job(M3, TINY, name="m3-tiny"),)
    return [Study("m3", {"demo": jobs, "default": jobs}, ("verdict.md", "summary.md"),
                  {"demo": "tiny"})]


def test_reproduce_fills_the_readme_block_and_resumes(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(README)
    blocks = reproduce("demo", tmp_path / "runs", readme, catalogue=_catalogue, log=lambda s: 0)
    text = readme.read_text()
    assert "old text" not in text and text.endswith("<!-- /reproduce:m3 -->\n\nafter\n")
    assert "*demo-sized run* (tiny)" in text and "make reproduce SIZE=demo" in text
    assert f"graddyn run {M3} --set {' '.join(TINY)} --name m3-tiny" in text
    assert "| (2) RM3 suppresses" in text and "| rm3 |" in text
    assert "**Rule.**" not in text and "**Parameters.**" in text  # the rule is stated once
    mtime = (tmp_path / "runs" / "m3-tiny" / "run.sqlite").stat().st_mtime
    again = reproduce("demo", tmp_path / "runs", None, catalogue=_catalogue, log=lambda s: 0)
    assert again["m3"] == blocks["m3"]  # the same runs: the same block, wall time included
    assert (tmp_path / "runs" / "m3-tiny" / "run.sqlite").stat().st_mtime >= mtime


def test_every_study_has_both_sizes_and_a_readme_block():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    for study in studies():
        assert set(study.jobs) == {"default", "demo"}, study.key
        assert f"<!-- reproduce:{study.key} -->" in readme, study.key
        for job in study.jobs["demo"]:
            assert job.name.endswith("-demo")


def test_strip_rule():
    assert strip_rule("# t\n\n**Rule.** r\n\n**Parameters.** p\n\n| a |\n") == \
        "**Parameters.** p\n\n| a |"


def test_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="size must be one of default, demo"):
        reproduce("huge", tmp_path, None, catalogue=_catalogue)
    with pytest.raises(ValueError, match="unknown studies \\['nope'\\]; valid: m3"):
        reproduce("demo", tmp_path, None, only=["nope"], catalogue=_catalogue)
    with pytest.raises(ValueError, match="add the lines '<!-- reproduce:m4 -->'"):
        replace_block(README, "m4", "x")
    with pytest.raises(SystemExit):
        main(["--size", "huge"])
