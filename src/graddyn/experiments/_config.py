"""Typed ``key=value`` overrides of a frozen dataclass config (nanoGPT's flat-config lesson,
with types checked instead of ``exec``).

>>> from dataclasses import dataclass
>>> from typing import Literal
>>> @dataclass(frozen=True)
... class C:
...     lr: float = 0.1
...     widths: tuple[int, ...] = (8, 8)
...     act: Literal["relu", "tanh"] = "relu"
>>> parse_overrides(C, ["lr=0.5", "widths=16,4", "act=tanh"])
C(lr=0.5, widths=(16, 4), act='tanh')
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class ConfigError(ValueError):
    """A bad override: unknown key, malformed ``key=value``, or a value of the wrong type."""


def field_types(config_cls: type) -> dict[str, Any]:
    """name -> resolved type of each dataclass field (string annotations resolved)."""
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"{config_cls!r} is not a dataclass; an experiment Config must be one")
    hints = typing.get_type_hints(config_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if get_origin(tp) is tuple:
        return "a comma-separated tuple of " + ", ".join(_describe(a) for a in get_args(tp)
                                                          if a is not Ellipsis)
    return getattr(tp, "__name__", str(tp))


def convert(key: str, text: str, tp: Any) -> Any:
    """Parse ``text`` as a value of type ``tp``; ``ConfigError`` naming the expected type."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and text.strip().lower() in ("none", "null"):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(key, text, arg)
            except ConfigError:
                continue
        raise ConfigError(f"bad value for {key}: {text!r} is not {_describe(tp)}")
    if origin is Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise ConfigError(
            f"bad value for {key}: {text!r}; expected one of {', '.join(map(str, args))}"
        )
    if origin in (tuple, list):
        return _convert_sequence(key, text, tp)
    try:
        return _convert_scalar(text, tp)
    except ValueError:
        raise ConfigError(
            f"bad value for {key}: {text!r} is not {_describe(tp)}"
        ) from None


def _convert_scalar(text: str, tp: Any) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in _TRUE | _FALSE:
            return low in _TRUE
        raise ValueError(text)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    if tp is str or tp is Any:
        return text
    raise TypeError(f"config fields of type {tp!r} cannot be set from the command line")


def _convert_sequence(key: str, text: str, tp: Any) -> Any:
    args = get_args(tp)
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis) or not args:
        elem = args[0] if args else str
        values = [convert(key, p, elem) for p in parts]
    else:
        if len(parts) != len(args):
            raise ConfigError(
                f"bad value for {key}: {text!r} has {len(parts)} items, expected {len(args)} "
                f"({_describe(tp)})"
            )
        values = [convert(key, p, a) for p, a in zip(parts, args)]
    return tuple(values) if get_origin(tp) is tuple else values


def split_override(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"expected key=value, got {item!r} (e.g. --set lr=0.1)")
    return key.strip(), value.strip()


def check_key(config_cls: type, key: str) -> Any:
    """The type of field ``key``; ``ConfigError`` listing the valid keys if there is none."""
    types_ = field_types(config_cls)
    if key not in types_:
        from graddyn._registry import suggest

        raise ConfigError(
            f"unknown config key {key!r} for {config_cls.__name__}{suggest(key, types_)}; "
            "valid keys: " + ", ".join(types_)
        )
    return types_[key]


def parse_overrides(config_cls: type, overrides: Sequence[str], base: Any = None) -> Any:
    """``config_cls()`` (or ``base``) with ``["key=value", ...]`` applied, each value
    type-checked against its field; the dataclass's own ``__post_init__`` checks run too (as
    ``ConfigError``)."""
    values = {}
    for item in overrides:
        key, text = split_override(item)
        values[key] = convert(key, text, check_key(config_cls, key))
    try:
        return dataclasses.replace(config_cls() if base is None else base, **values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid {config_cls.__name__}: {err}") from err


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a config (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(config_cls: type, data: dict[str, Any]) -> Any:
    """Inverse of ``config_to_dict`` (lists back to tuples); unknown keys are an error."""
    for key in data:
        check_key(config_cls, key)
    return config_cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def check_min(config: Any, names: str, low: int = 1, above: bool = False) -> None:
    """``ValueError`` naming the first of ``names`` (space-separated fields) below ``low``, or
    with ``above`` not above it."""
    for name in names.split():
        value = getattr(config, name)
        if value < low or (above and value == low):
            raise ValueError(f"{name} must be {'>' if above else '>='} {low}, got {value}")


def set_names(config: Any, field: str, valid: Any) -> None:
    """Store a names field given as a tuple or ``"a,b"`` as a tuple (frozen ``config``);
    ``ValueError`` listing the ``valid`` names if it is empty or has an unknown one."""
    names = getattr(config, field)
    if isinstance(names, str):
        names = [o.strip() for o in names.split(",") if o.strip()]
    object.__setattr__(config, field, tuple(names))
    unknown = [o for o in names if o not in valid]
    if unknown or not names:
        raise ValueError(f"unknown {field} {unknown or '(none given)'}; valid: "
                         f"{', '.join(valid)}")


def config_from_run(config_cls: type, run: Any) -> Any:
    """The config ``run`` was made with (``run.config``); keys the class no longer has (runs
    made by an older version) are left out."""
    known = {f.name for f in dataclasses.fields(config_cls)}
    return config_from_dict(config_cls, {k: v for k, v in run.config.items() if k in known})


def format_value(value: Any) -> str:
    """The ``--set`` spelling of a value (tuples comma-separated)."""
    if isinstance(value, (tuple, list)):
        return ",".join(format_value(v) for v in value)
    return str(value)


def default_run_name(experiment: str, config: Any, max_len: int = 120) -> str:
    """Deterministic run name: the experiment plus every field that differs from the default,
    sorted (``label-noise__lr=0.5_noise=0.25``), so the same config always maps to the same
    run (that is how sweeps skip finished runs)."""
    default = type(config)()
    diffs = [
        f"{f.name}={format_value(getattr(config, f.name))}"
        for f in sorted(dataclasses.fields(config), key=lambda f: f.name)
        if getattr(config, f.name) != getattr(default, f.name)
    ]
    name = re.sub(r"[^A-Za-z0-9._=,+@-]", "-", "__".join([experiment, "_".join(diffs)]))
    name = name.rstrip("_") if not diffs else name
    if len(name) > max_len:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: max_len - 11]}-{digest}"
    return name


def type_name(tp: Any) -> str:
    """Short spelling of a field type for ``graddyn list NAME``: ``int``, ``{mlp,cnn}``,
    ``tuple[int,...]``, ``float|None``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "{" + ",".join(map(str, args)) + "}"
    if origin in (Union, types.UnionType):
        return "|".join("None" if a is type(None) else type_name(a) for a in args)
    if origin in (tuple, list):
        inner = ",".join("..." if a is Ellipsis else type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def field_help(config_cls: type) -> dict[str, str]:
    """One line of help per field, from the class source: the field's trailing ``# comment``
    (or the comment line just above it), else the first sentence of the class docstring
    that names it in ````name````."""
    import inspect

    from graddyn.experiments._base import first_sentence

    names = set(field_types(config_cls))
    out: dict[str, str] = {}
    try:
        lines = inspect.getsource(config_cls).splitlines()
    except (OSError, TypeError):
        lines = []
    above = ""
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            above = (above + " " + text.lstrip("# ")).strip()
            continue
        m = re.match(r"(\w+)\s*:[^#]*?(?:#\s*(.*))?$", text)
        if m and m.group(1) in names and m.group(1) not in out:
            out[m.group(1)] = first_sentence(m.group(2) or above)
        above = ""
    doc = " ".join((config_cls.__doc__ or "").split())
    for name in names:
        if not out.get(name):
            said = [s for s in re.split(r"(?<=\.)\s+", doc)
                    if f"``{name}``" in s or s.startswith(f"``{name}=")]
            out[name] = first_sentence(said[0]) if said else COMMON_HELP.get(name, "")
    return out


# Help for the keys most experiments share, where their own source says nothing more.
COMMON_HELP = {
    "seed": "random seed (data order, initialisation, label noise)",
    "seeds": "random seeds; results are reported over them",
    "lr": "learning rate",
    "steps": "optimizer steps",
    "epochs": "passes over the training set",
    "batch_size": "minibatch size",
    "dataset": "dataset name (graddyn list datasets)",
    "data_root": "folder of local datasets ('' -> $GRADDYN_DATA or ./data)",
    "model": "model family (graddyn list models)",
    "width": "hidden units per layer",
    "depth": "hidden layers",
    "init": "weight initialisation (xavier, xavier-sqrt2, kaiming, orthogonal, gaussian, "
            "pytorch)",
    "preprocess": "input preprocessing: 'scale' (pixels / 255) or 'standardize' (per dataset)",
    "n_train": "training examples used",
    "n_test": "test examples used",
    "noise": "fraction of training labels shuffled among themselves",
    "eval_every": "steps between evaluations on the training and test sets",
    "eval_points": "evaluations on the training and test sets over the run",
    "checkpoint_every": "steps between checkpoints (what --resume continues from)",
    "checkpoint_points": "checkpoints over the run (what --resume continues from)",
    "optimizer": "optimizer",
    "momentum": "SGD momentum",
    "weight_decay": "L2 weight decay",
    "classes": "number of classes",
    "dim": "input dimension",
    "study": "which sub-study to run",
    # keys of one or two experiments whose source has no comment on them
    "noise_levels": "label-noise fractions, one trainer (and one report line) each",
    "null_worlds": "null worlds (random relabellings) the pristine share is compared with",
    "activation": "hidden-layer nonlinearity",
    "sgd_lr": "learning rate of SGD",
    "adam_lr": "learning rate of Adam",
    "pso_popsize": "particle-swarm population size",
    "pso_sigma": "particle-swarm initial spread",
    "skip": "skip (residual) connections",
    "lr_gamma": "factor the learning rate is multiplied by at each lr_milestones epoch",
    "mb_size": "examples per minibatch gradient in the minibatch form of confusion",
    "target_loss": "training speed: first step with training loss <= this",
    "alphas": "weights alpha of the transferred / fused weights",
    "tasks": "task pair: split digits or permuted pixels",
    "ewc_lambdas": "EWC penalty weights tried",
    "max_test": "test examples used (0: all)",
    "algorithms": "algorithms compared",
    "backend": "torch.distributed backend (auto: nccl with GPUs, else gloo)",
    "models": "model families compared",
    "weight_decays": "weight-decay grid tuned on a validation split",
    "n_images": "synthetic images",
    "size": "image side in pixels",
    "warmup_steps": "plain training steps before the comparison starts",
    "data_margin": "l2 margin of the generated separable data",
    "n_records": "log-spaced steps at which the angle is recorded",
    "network": "also train the two-layer ReLU network",
    "net_width": "hidden units of the network",
    "net_steps": "training steps of the network",
    "net_lr": "learning rate of the network",
    "net_eps_frac": "network's perturbation radius as a fraction of its margin",
    "pgd_steps": "projected-gradient steps of the attack",
    "clf_steps": "training steps of the attacked classifier",
    "n_tasks_eval": "held-out tasks",
    "sine_width": "hidden units of the sinusoid regressor",
    "sine_lr": "Adam learning rate on the sinusoid tasks",
}


def describe_config(config_cls: type) -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` of every field, in declaration order."""
    default = config_cls()
    helps = field_help(config_cls)
    return [(name, type_name(tp), format_value(getattr(default, name)), helps.get(name, ""))
            for name, tp in field_types(config_cls).items()]
