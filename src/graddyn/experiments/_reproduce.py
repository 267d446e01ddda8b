"""``make reproduce``: run every study's default configuration (or the demo-sized one) with its
seeds, write each report, and rebuild the README's "What the studies show" tables from the
generated files, so that every verdict word in the README comes from code.

Each study's block in the README lies between ``<!-- reproduce:KEY -->`` and
``<!-- /reproduce:KEY -->``; only those blocks are rewritten. A block says which size made it,
the commands, the generated verdict table (the rule is stated once, above the studies) and
the generated summary table.

    python -m graddyn.experiments._reproduce                    # every study, default size
    python -m graddyn.experiments._reproduce --size demo        # every study, demo-sized
    python -m graddyn.experiments._reproduce --only winsorize --readme README.md
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from graddyn.experiments._runner import report, run_experiment
from graddyn.experiments._sweep import run_sweep
from graddyn.train import RunStore

SIZES = ("default", "demo")


@dataclass(frozen=True)
class Job:
    """One command: ``graddyn run EXPERIMENT --set ...`` or, with a grid, ``graddyn sweep``."""

    experiment: str
    overrides: tuple[str, ...] = ()
    grid: tuple[str, ...] = ()
    name: str = ""  # run or sweep name (required)

    def command(self, root: str) -> str:
        sets = f" --set {' '.join(self.overrides)}" if self.overrides else ""
        if self.grid:
            return (f"graddyn sweep {self.experiment} --grid {' '.join(self.grid)}{sets} "
                    f"--name {self.name} --root {root}")
        return f"graddyn run {self.experiment}{sets} --name {self.name} --root {root}"


@dataclass(frozen=True)
class Study:
    """A README block: the jobs of each size and the generated files shown from each job's
    report folder (``{name}`` in a file name is the job's name)."""

    key: str
    jobs: dict[str, tuple[Job, ...]]
    shown: tuple[str, ...] = ("verdict.md",)
    note: dict[str, str] = field(default_factory=dict)  # size -> what is shortened


def _ln(size: str, *jobs: Job) -> tuple[Job, ...]:
    return tuple(Job(j.experiment, j.overrides, j.grid, f"{j.name}-{size}") for j in jobs)


def studies() -> list[Study]:
    """Every study of the README with its default and demo-sized jobs."""
    ln, ws, m3 = ("coherent-gradients.label-noise", "coherent-gradients.winsorize",
                  "coherent-gradients.median-of-3")
    ln_demo = ("n_train=2000", "steps=400", "split_steps=50", "eval_points=10")
    ws_grid = ("c=8,4,1,0", "noise=0,0.5")
    conf_demo = ("epochs=3", "depths=1,4,16")
    return [
        Study("label-noise", {
            "default": _ln("default", Job(ln, name="label-noise")),
            "demo": _ln("demo", Job(ln, ln_demo, name="label-noise"))},
            ("verdict.md", "levels.md"),
            {"demo": "2,000 of the 4,000 images, 400 steps per level instead of 4,000"}),
        Study("label-noise-mnist1d", {
            "default": _ln("default", Job(ln, ("dataset=mnist1d",), name="label-noise-mnist1d")),
            "demo": _ln("demo", Job(ln, ("dataset=mnist1d", *ln_demo),
                                    name="label-noise-mnist1d"))},
            ("verdict.md", "levels.md"),
            {"demo": "2,000 of the 4,000 signals, 400 steps per level instead of 4,000"}),
        Study("winsorize", {
            "default": _ln("default", Job(ws, grid=ws_grid, name="winsorize")),
            "demo": _ln("demo", Job(ws, ("steps=100",), ws_grid, name="winsorize"))},
            ("verdict.md", "summary.md"), {"demo": "100 steps instead of 300"}),
        Study("winsorize-mnist1d", {
            "default": _ln("default", Job(ws, ("dataset=mnist1d",), ws_grid,
                                          name="winsorize-mnist1d")),
            "demo": _ln("demo", Job(ws, ("dataset=mnist1d", "steps=100"), ws_grid,
                                    name="winsorize-mnist1d"))},
            ("verdict.md", "summary.md"), {"demo": "100 steps instead of 300"}),
        Study("median-of-3", {
            "default": _ln("default", Job(m3, name="median-of-3")),
            "demo": _ln("demo", Job(m3, ("n_train=500", "steps=300"), name="median-of-3"))},
            ("verdict.md", "summary.md"),
            {"demo": "500 images and 300 minibatches instead of 1,000 and 1,500"}),
        *(Study(f"confusion-{s}", {
            "default": _ln("default", Job("gradient-confusion", (f"study={s}",),
                                          name=f"confusion-{s}")),
            "demo": _ln("demo", Job("gradient-confusion", (f"study={s}", *(
                conf_demo if s == "depth" else ("epochs=3",))), name=f"confusion-{s}"))},
            (f"{s}_verdict_grid.md",), {"demo": "3 epochs instead of the study's default"})
          for s in ("width", "depth", "bn-skip", "init")),
        Study("tracin", {
            "default": _ln("default", Job("tracin.mislabel", name="tracin")),
            "demo": _ln("demo", Job("tracin.mislabel", ("epochs=30",), name="tracin"))},
            ("{name}_verdict.md", "{name}_summary.md"), {"demo": "30 epochs instead of 100"}),
        Study("frequency-principle", {
            "default": _ln("default", Job("frequency-principle", name="frequency-principle")),
            "demo": _ln("demo", Job("frequency-principle", ("max_evals=2000", "n_records=20"),
                                    name="frequency-principle"))},
            ("{name}_summary.md",), {"demo": "2,000 loss evaluations instead of 20,000"}),
        *(Study(f"gradient-transfer-{s}", {
            "default": _ln("default", Job("gradient-transfer", (f"study={s}",),
                                          name=f"gradient-transfer-{s}")),
            "demo": _ln("demo", Job("gradient-transfer", (f"study={s}", "epochs=5"),
                                    name=f"gradient-transfer-{s}"))},
            ("{name}_verdict.md",), {"demo": "5 epochs instead of 20"})
          for s in ("alpha-sweep", "fusion", "forgetting")),
        Study("optimum-shifting", {
            "default": _ln("default", Job("optimum-shifting", name="optimum-shifting")),
            "demo": _ln("demo", Job("optimum-shifting", ("models=cnn", "steps=150"),
                                    name="optimum-shifting"))},
            ("{name}-verdict.md",), {"demo": "the CNN only, 150 steps instead of 200"}),
        Study("lsgd", {
            "default": _ln("default", Job("lsgd", name="lsgd")),
            "demo": _ln("demo", Job("lsgd", ("workers=1,2", "steps=60", "eval_every=20"),
                                    name="lsgd"))},
            ("lsgd-{name}_verdict.md",), {"demo": "1 and 2 workers, 60 steps instead of 300"}),
        Study("learned-init", {
            "default": _ln("default", Job("learned-init", name="learned-init")),
            "demo": _ln("demo", Job("learned-init", ("n_fit=200", "n_eval=100", "n_tasks_fit=10",
                                                     "n_tasks_eval=4"), name="learned-init"))},
            ("{name}_verdict.md",), {"demo": "fewer fitted and held-out instances and tasks"}),
        Study("adm-vs-gd", {
            "default": _ln("default", Job("adm-vs-gd", name="adm-vs-gd")),
            "demo": _ln("demo", Job("adm-vs-gd", ("n_images=6", "outer=8"), name="adm-vs-gd"))},
            ("{name}_verdict.md",), {"demo": "6 images and 8 ADM iterations instead of 12 and 20"}),
        Study("adversarial-bias", {
            "default": _ln("default", Job("adversarial-bias", name="adversarial-bias")),
            "demo": _ln("demo", Job("adversarial-bias", ("steps=2000", "net_steps=100"),
                                    name="adversarial-bias"))},
            ("{name}_verdict.md",), {"demo": "2,000 GD steps instead of 20,000"}),
    ]


def run_job(job: Job, root: Path) -> Path:
    """Run (resuming an unfinished run; a finished run or sweep point is kept as it is) and
    report one job; returns the report folder."""
    if job.grid:
        run_sweep(job.experiment, job.grid, job.overrides, root=root, name=job.name)
    else:
        store = RunStore(root)
        if not (store.exists(job.name) and store.open(job.name).status == "finished"):
            run_experiment(job.experiment, job.overrides, root=root, run_name=job.name,
                           resume=store.exists(job.name), progress=False)
    return report(job.name, root=root).parent


def wall_seconds(job: Job, root: Path) -> float:
    """Wall time of a job's runs from the run store (created -> finished; a sweep adds its
    runs up), so a block made again from finished runs still gives the training time."""
    store = RunStore(root)
    manifest = root / job.name / "sweep.json"
    names = json.loads(manifest.read_text())["runs"] if manifest.is_file() else [job.name]
    total = 0.0
    for name in names:
        run = store.open(name)
        start, end = run.get_meta("created"), run.get_meta("finished")
        if start and end:
            total += (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
    return total


def strip_rule(markdown: str) -> str:
    """A generated file without its ``**Rule.**`` paragraph (the README states the rule once)
    and without a leading ``#`` title."""
    keep = [p for p in markdown.strip().split("\n\n")
            if not p.startswith("**Rule.**") and not p.startswith("# ")]
    return "\n\n".join(keep)


def block(study: Study, size: str, folders: Sequence[Path], root: str, seconds: float) -> str:
    """The README block of ``study``: size, commands, generated tables."""
    jobs = study.jobs[size]
    lines = [f"*{size}-sized run*" + (f" ({study.note[size]})" if size in study.note else "")
             + f", {seconds:.0f} s of run wall time (run store); "
             "made by `make reproduce"
             + (" SIZE=demo" if size == "demo" else "") + "`:", "", "```bash"]
    lines += [".venv/bin/" + j.command(root) for j in jobs]
    lines += ["```", ""]
    for job, folder in zip(jobs, folders):
        for name in study.shown:
            path = folder / name.format(name=job.name)
            lines += [strip_rule(path.read_text()), ""]
    return "\n".join(lines).rstrip() + "\n"


def replace_block(readme: str, key: str, text: str) -> str:
    """``readme`` with the text between the markers of ``key`` replaced."""
    pattern = re.compile(rf"(<!-- reproduce:{re.escape(key)} -->\n).*?(<!-- /reproduce:"
                         rf"{re.escape(key)} -->)", re.S)
    if not pattern.search(readme):
        raise ValueError(f"the README has no block for {key!r}; add the lines "
                         f"'<!-- reproduce:{key} -->' and '<!-- /reproduce:{key} -->' where "
                         "its tables belong")
    return pattern.sub(lambda m: m.group(1) + text + m.group(2), readme)


def reproduce(size: str, root: Path, readme: Path | None, only: Sequence[str] = (),
              catalogue: Callable[[], list[Study]] = studies,
              log: Callable[[str], None] = print) -> dict[str, str]:
    """Run the studies (all, or ``only`` these keys) at ``size`` and, if ``readme`` is given,
    rewrite their blocks in it. Returns key -> block."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    known = {s.key: s for s in catalogue()}
    unknown = [k for k in only if k not in known]
    if unknown:
        raise ValueError(f"unknown studies {unknown}; valid: {', '.join(known)}")
    blocks = {}
    for key, study in known.items():
        if only and key not in only:
            continue
        log(f"[reproduce] {key} ({size})")
        folders = [run_job(job, root) for job in study.jobs[size]]
        seconds = sum(wall_seconds(job, root) for job in study.jobs[size])
        blocks[key] = block(study, size, folders, str(root), seconds)
        if readme is not None:  # after each study, so an interrupted run keeps what it made
            readme.write_text(replace_block(readme.read_text(), key, blocks[key]))
    return blocks


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m graddyn.experiments._reproduce",
                                description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="default")
    p.add_argument("--root", type=Path, default=Path("runs/reproduce"))
    p.add_argument("--readme", type=Path, default=Path("README.md"))
    p.add_argument("--only", nargs="*", default=[], help="study keys (default: all)")
    args = p.parse_args(argv)
    reproduce(args.size, args.root, args.readme, args.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
