"""``graddyn``: list / run / sweep / report / show / export / demo. A thin shell over
``graddyn.experiments`` (every command is one importable, tested function call).

Usage errors (unknown experiment, unknown config key, bad value, bad run name, existing run,
a run another process is writing) go to stderr with exit code 2 and a message naming the fix;
a failing run exits with 1 and the command that resumes it; Ctrl-C or SIGTERM marks the run
``interrupted`` and exits with 130 after one line giving the resume command.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

# The experiment ``graddyn demo`` runs (its ``demo_config()``), then reports.
DEMO_EXPERIMENT = "coherent-gradients.label-noise"
FALLBACK_DEMO = "smoke"  # built in; used while DEMO_EXPERIMENT is not registered

# what -> (module, registry attribute)
_REGISTRIES = {
    "experiments": ("graddyn.experiments", "EXPERIMENTS"),
    "instruments": ("graddyn.instruments", "INSTRUMENTS"),
    "datasets": ("graddyn.data", "DATASETS"),
    "models": ("graddyn.models", "MODELS"),
}


class UsageError(Exception):
    """A mistake on the command line; printed without a traceback, exit code 2."""


def list_registry(what: str) -> list[str]:
    """Lines describing one registry; a package that is missing or broken is reported, not
    raised, so ``graddyn list`` works while parts of graddyn are under construction.
    Experiments are listed from their sources, without importing them."""
    from graddyn.experiments._base import first_sentence

    module, attr = _REGISTRIES[what]
    try:
        pkg = importlib.import_module(module)
        if what == "experiments":
            found = {n: summary for n, (_, summary) in pkg.index().items()}
        else:
            reg = getattr(pkg, attr)
            found = {n: _summary(reg.get(n), first_sentence) for n in reg.names()}
    except Exception as err:
        return [f"  (not available: {type(err).__name__}: {err})"]
    lines = [f"  {name:<36} {text}".rstrip() for name, text in sorted(found.items())]
    if what == "experiments":
        lines += [f"  [failed to import {m}] {e}" for m, e in sorted(pkg.IMPORT_ERRORS.items())]
    return lines or ["  (none registered)"]


def _summary(obj: object, first_sentence: Callable[[str], str]) -> str:
    doc = getattr(obj, "summary", None)
    return doc() if callable(doc) else first_sentence(getattr(obj, "__doc__", "") or "")


def describe_experiment(name: str) -> list[str]:
    """``graddyn list NAME``: the experiment's summary and every config key with its type,
    default and one line of help."""
    from graddyn.experiments import get_experiment
    from graddyn.experiments._config import describe_config

    exp = get_experiment(name)
    rows = describe_config(exp.Config)
    wk = max(len(r[0]) for r in rows)
    wt = max(len(r[1]) for r in rows)
    wd = min(max(len(r[2]) for r in rows), 24)
    lines = [f"{name}: {exp.summary()}", "",
             f"config keys (graddyn run {name} --set KEY=VALUE ...):",
             f"  {'key':<{wk}}  {'type':<{wt}}  {'default':<{wd}}  help"]
    lines += [f"  {k:<{wk}}  {t:<{wt}}  {d or repr(d):<{wd}}  {h}".rstrip()
              for k, t, d, h in rows]
    return lines


def cmd_list(args: argparse.Namespace) -> int:
    if args.what and args.what not in _REGISTRIES:
        print("\n".join(describe_experiment(args.what)))
        return 0
    for what in [args.what] if args.what else list(_REGISTRIES):
        print(f"{what}:")
        print("\n".join(list_registry(what)))
    if not args.what:
        print("\n`graddyn list EXPERIMENT` shows its config keys with types, defaults and help")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from graddyn.experiments import EXPERIMENTS, run_experiment
    from graddyn.train import RunStore

    experiment, name = args.experiment, args.name
    if args.resume and name is None and experiment not in EXPERIMENTS:
        store = RunStore(args.root)  # `graddyn run RUN --resume`: the run names its experiment
        if store.exists(experiment):
            with store.open(experiment) as existing:
                experiment, name = existing.experiment or experiment, existing.name
    run = run_experiment(experiment, args.set, root=args.root, run_name=name,
                         resume=args.resume, progress=not args.quiet, log=_log_targets(args))
    print(f"run {run.name}: {run.status} ({run.dir})")
    return 0


def _log_targets(args: argparse.Namespace) -> list[str]:
    from graddyn.train._sinks import check_sinks

    try:
        return check_sinks([t for t in (args.log or "").split(",") if t.strip()])
    except (ValueError, ImportError) as err:
        raise UsageError(f"--log: {err}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    from graddyn.experiments import run_sweep

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    res = run_sweep(args.experiment, args.grid, args.set, root=args.root, workers=args.workers,
                    name=args.name, log=_log_targets(args),
                    progress=None if args.quiet else progress, backend=args.backend,
                    address=args.address, retries=args.retries)
    print(f"sweep {res.name}: {len(res.runs)} runs, {len(res.skipped)} already finished, "
          f"{len(res.failed)} failed, {len(res.retried)} retried ({res.dir})")
    for name, err in res.failed.items():
        print(f"  failed {name}: {err}", file=sys.stderr)
    return 1 if res.failed else 0


def cmd_report(args: argparse.Namespace) -> int:
    from graddyn.experiments import report

    out = report(args.target, root=args.root, out_dir=args.out)
    print(f"report: {out}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from graddyn.experiments import show

    print(show(args.run, root=args.root))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from graddyn.train import RunStore
    from graddyn.train._sinks import export_run

    try:
        with RunStore(args.root).open(args.run) as run:
            where = export_run(run, args.to, args.out)
    except ImportError as err:
        raise UsageError(str(err)) from None
    print(f"exported {args.run} to {args.to}: {where}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """Time the engine's three kinds of product and save the rates its cost model reads."""
    import torch

    from graddyn.pergrad._cost import calibrate, cost_file

    before = torch.get_num_threads()
    torch.set_num_threads(args.threads or before)
    try:
        got = calibrate(device=args.device)
        print(f"per multiply-add, relative to a Gram of materialised rows: ghost "
              f"{got.ghost:.2f}, build {got.build:.2f} ({torch.get_num_threads()} threads); "
              f"saved to {cost_file(args.device)}")
    finally:
        torch.set_num_threads(before)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo experiment's short config (resuming a previous demo run), then report."""
    from graddyn.experiments import EXPERIMENTS, get_experiment, report, run_experiment

    name = DEMO_EXPERIMENT if DEMO_EXPERIMENT in EXPERIMENTS else FALLBACK_DEMO
    if name != DEMO_EXPERIMENT:
        print(f"{DEMO_EXPERIMENT!r} is not available yet; running the built-in {name!r}",
              file=sys.stderr)
    config = get_experiment(name).demo_config()
    run = run_experiment(name, root=args.root, run_name=f"demo-{name}", resume="if-exists",
                         config=config, progress=not args.quiet)
    out = report(run.name, root=args.root)
    print(f"demo report: {out}")
    from dataclasses import asdict

    from graddyn.experiments._verdicts import departures

    changed = departures(asdict(config), type(config)())
    print(f"demo-sized run, differs from the study's default config in: {changed}; the full "
          f"study: graddyn run {name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="graddyn", description="graddyn: gradient-level training dynamics experiments"
    )
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--root", default="runs", help="folder holding runs (default: runs)")
        return sp

    sp = add("list", "list experiments, instruments, datasets or models; or one experiment's "
                     "config keys")
    sp.add_argument("what", nargs="?", metavar="WHAT",
                    help=f"{', '.join(_REGISTRIES)}, or an experiment name (its config keys "
                         "with types, defaults and help)")
    sp.set_defaults(func=cmd_list)
    for name, help in (("run", "run a named experiment"), ("sweep", "run a grid of configs")):
        sp = add(name, help)
        sp.add_argument("experiment")
        sp.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set lr=0.1 steps=500")
        sp.add_argument("--name", help="run (or sweep) name; default: derived from the config")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
        sp.add_argument("--log", metavar="TARGETS",
                        help="also copy metrics to tensorboard and/or mlflow, e.g. --log "
                             "tensorboard,mlflow (run.sqlite stays the source of truth)")
    sub.choices["run"].add_argument(
        "--resume", action="store_true",
        help="continue an existing run from its latest checkpoint (graddyn run RUN --resume, "
             "or graddyn run EXPERIMENT --name RUN --resume)")
    sub.choices["run"].set_defaults(func=cmd_run)
    sw = sub.choices["sweep"]
    sw.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                    help="grid axes, e.g. --grid noise=0,0.5 c=0,1 (tuple fields: ';' between)")
    sw.add_argument("--workers", type=int, default=1, help="parallel worker processes")
    sw.add_argument("--backend", choices=["local", "ray"], default="local",
                    help="local worker processes (default) or Ray tasks")
    sw.add_argument("--address", help="Ray cluster to join (default: start a local one)")
    sw.add_argument("--retries", type=int, default=1,
                    help="times a point whose worker died is resumed (default 1)")
    sw.set_defaults(func=cmd_sweep)
    sp = add("report", "figures + one self-contained report.html for a run or sweep")
    sp.add_argument("target", metavar="RUN_OR_SWEEP")
    sp.add_argument("--out", type=Path, help="output folder (default: <run>/report)")
    sp.set_defaults(func=cmd_report)
    sp = add("show", "a table of a run's latest metrics, or of a sweep's runs")
    sp.add_argument("run", metavar="RUN_OR_SWEEP")
    sp.set_defaults(func=cmd_show)
    sp = add("export", "copy a run's metrics to TensorBoard event files, MLflow or CSV")
    sp.add_argument("run", metavar="RUN")
    sp.add_argument("--to", required=True, choices=["tensorboard", "mlflow", "csv"])
    sp.add_argument("--out", help="where (default: <run>/tensorboard, <root>/mlruns, "
                                  "<run>/metrics.csv; for mlflow also a tracking URI)")
    sp.set_defaults(func=cmd_export)
    sp = add("calibrate", "measure this machine's speeds for the per-example engine's choice "
                          "between ghost and materialised products (a few seconds)")
    sp.add_argument("--device", default="cpu", help="torch device to calibrate (default cpu)")
    sp.add_argument("--threads", type=int, default=0,
                    help="torch threads to calibrate at (default: torch's default)")
    sp.set_defaults(func=cmd_calibrate)
    sp = add("demo", f"run {DEMO_EXPERIMENT!r} (short config) and write its report")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_demo)
    return p


def _warning(message: Warning | str, category: type[Warning], *args: object,
             **kwargs: object) -> str:
    return f"{message}\n"  # graddyn's warnings name the file themselves; no source line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graddyn`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)  # before any heavy import: --help stays instant
    from graddyn._registry import UnknownNameError
    from graddyn.experiments._config import ConfigError

    usage: tuple[type[BaseException], ...] = (UsageError, UnknownNameError, ConfigError)
    in_main = threading.current_thread() is threading.main_thread()  # signal() needs it
    previous, installed = None, False
    if args.command != "list":  # `graddyn list experiments` needs neither torch nor runs
        from graddyn.experiments._runner import interrupt_on_sigterm
        from graddyn.train import RunExistsError, RunNotFoundError
        from graddyn.train._lock import RunLockedError
        from graddyn.train._store import InvalidRunNameError

        usage += (RunExistsError, RunNotFoundError, InvalidRunNameError, RunLockedError)
        if in_main:
            previous, installed = interrupt_on_sigterm(), True
    formatter, warnings.formatwarning = warnings.formatwarning, _warning
    try:
        return args.func(args)
    except BrokenPipeError:  # `graddyn show X | head`: the reader left; stop quietly
        _silence_stdout()
        return 141  # as a process killed by SIGPIPE
    except usage as err:
        print(f"graddyn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"graddyn {args.command}: {err or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as err:
        print(f"graddyn {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        if getattr(err, "resume_command", None):
            print(f"graddyn {args.command}: resume with: {err.resume_command}",
                  file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = formatter
        if installed:
            signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit raises no second error."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
