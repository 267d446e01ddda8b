"""``graddyn``: list / run / sweep / report / show / demo. A thin shell over
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
from collections.abc import Sequence
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
    raised, so ``graddyn list`` works while parts of graddyn are under construction."""
    module, attr = _REGISTRIES[what]
    try:
        reg = getattr(importlib.import_module(module), attr)
    except Exception as err:
        return [f"  (not available: {type(err).__name__}: {err})"]
    lines = []
    for name in reg.names():
        doc = getattr(reg.get(name), "summary", None)
        text = doc() if callable(doc) else (getattr(reg.get(name), "__doc__", "") or "")
        first = text.strip().splitlines()[0] if text.strip() else ""
        lines.append(f"  {name:<36} {first}".rstrip())
    if what == "experiments":
        errors = importlib.import_module(module).IMPORT_ERRORS
        lines += [f"  [failed to import {m}] {e}" for m, e in sorted(errors.items())]
    return lines or ["  (none registered)"]


def cmd_list(args: argparse.Namespace) -> int:
    for what in [args.what] if args.what else list(_REGISTRIES):
        print(f"{what}:")
        print("\n".join(list_registry(what)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from graddyn.experiments import run_experiment

    run = run_experiment(args.experiment, args.set, root=args.root, run_name=args.name,
                         resume=args.resume, progress=not args.quiet)
    print(f"run {run.name}: {run.status} ({run.dir})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from graddyn.experiments import run_sweep

    res = run_sweep(args.experiment, args.grid, args.set, root=args.root, workers=args.workers,
                    name=args.name, backend=args.backend, address=args.address,
                    retries=args.retries)
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

    sp = add("list", "list experiments, instruments, datasets or models")
    sp.add_argument("what", nargs="?", choices=list(_REGISTRIES))
    sp.set_defaults(func=cmd_list)
    for name, help in (("run", "run a named experiment"), ("sweep", "run a grid of configs")):
        sp = add(name, help)
        sp.add_argument("experiment")
        sp.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set lr=0.1 steps=500")
        sp.add_argument("--name", help="run (or sweep) name; default: derived from the config")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.choices["run"].add_argument("--resume", action="store_true",
                                    help="continue an existing run from its latest checkpoint")
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
    sp = add("show", "a table of a run's latest metrics")
    sp.add_argument("run")
    sp.set_defaults(func=cmd_show)
    sp = add("demo", f"run {DEMO_EXPERIMENT!r} (short config) and write its report")
    sp.add_argument("--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=cmd_demo)
    return p


def _warning(message: Warning | str, category: type[Warning], *args: object,
             **kwargs: object) -> str:
    return f"{message}\n"  # graddyn's warnings name the file themselves; no source line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``graddyn`` console script; returns the exit code."""
    from graddyn._registry import UnknownNameError
    from graddyn.experiments._config import ConfigError
    from graddyn.experiments._runner import interrupt_on_sigterm
    from graddyn.train import RunExistsError, RunNotFoundError
    from graddyn.train._lock import RunLockedError
    from graddyn.train._store import InvalidRunNameError

    args = build_parser().parse_args(argv)
    usage = (UsageError, UnknownNameError, ConfigError, RunExistsError, RunNotFoundError,
             InvalidRunNameError, RunLockedError)
    in_main = threading.current_thread() is threading.main_thread()  # signal() needs it
    previous = interrupt_on_sigterm() if in_main else None
    formatter, warnings.formatwarning = warnings.formatwarning, _warning
    try:
        return args.func(args)
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
        if in_main:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
