"""Resolve the ``params=`` and ``strategy=`` arguments of :func:`graddyn.capture`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from torch import nn

from ._paramgrads import STRATEGIES

ParamSpec = "None | str | nn.Module | nn.Parameter | Iterable[str | nn.Module | nn.Parameter]"


def resolve_params(model: nn.Module, params: object,
                   named_parameters: list[tuple[str, nn.Parameter]] | None = None
                   ) -> dict[int, str]:
    """-> {id(parameter): name in model.named_parameters()} for the captured parameters.

    ``params``: None (every parameter with requires_grad), or names of parameters or modules,
    modules, parameters (one or an iterable of them). Unknown names raise a ValueError that
    lists the valid ones. ``named_parameters``: ``list(model.named_parameters())`` if the
    caller already has it.
    """
    named = dict(model.named_parameters() if named_parameters is None else named_parameters)
    by_id = {id(p): k for k, p in named.items()}
    if params is None:
        return {id(p): k for k, p in named.items() if p.requires_grad}
    if isinstance(params, (str, nn.Module, nn.Parameter)):
        params = [params]
    modules = dict(model.named_modules())
    out: dict[int, str] = {}
    for item in params:  # type: ignore[union-attr]
        if isinstance(item, str) and item in named:
            found = [named[item]]
        elif isinstance(item, str) and item in modules:
            found = list(modules[item].parameters())
        elif isinstance(item, nn.Module):
            found = list(item.parameters())
        elif isinstance(item, nn.Parameter):
            found = [item]
        else:
            raise ValueError(
                f"params: {item!r} is neither a parameter nor a module name of the model. "
                f"Valid parameter names: {sorted(named)}; module names: "
                f"{sorted(k for k in modules if k)}."
            )
        for p in found:
            if id(p) not in by_id:
                raise ValueError(f"params: a given parameter of shape {tuple(p.shape)} is not "
                                 "a parameter of the model passed to capture(); pass the "
                                 "model's own modules/parameters.")
            out[id(p)] = by_id[id(p)]
    if not out:
        raise ValueError("params selects no parameter; pass None to capture all of them.")
    return {id(p): k for k, p in named.items() if id(p) in out}  # model order


def resolve_strategy(strategy: str | Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """-> {parameter name: 'auto'|'ghost'|'materialize'}; a mapping may name parameters or
    module prefixes (``{"fc1": "ghost"}``); unnamed ones use 'auto'."""
    names = list(names)
    if isinstance(strategy, str):
        strategy = {"": strategy}
    out = {}
    for key, value in strategy.items():
        if value not in STRATEGIES:
            raise ValueError(f"strategy {value!r} for {key!r} is not one of {STRATEGIES}.")
        hits = [k for k in names if key == "" or k == key or k.startswith(key + ".")]
        if not hits:
            raise ValueError(f"strategy key {key!r} matches no captured parameter; "
                             f"captured: {names}.")
        out.update(dict.fromkeys(hits, value))
    return {k: out.get(k, "auto") for k in names}
