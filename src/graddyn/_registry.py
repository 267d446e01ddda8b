"""One name -> object registry per kind (instruments, experiments, datasets, models).

An unknown name raises a ``KeyError`` that lists the valid names, so a typo on the command
line is answered with the fix.

>>> models = Registry("model")
>>> @models.register("mlp")
... def build_mlp(width: int = 8):
...     return width
>>> models.get("mlp")()
8
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def suggest(name: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` naming the closest of ``choices`` to ``name``, or ``""``.

    >>> suggest("cofusion", ["confusion", "coherence"])
    "; did you mean 'confusion'?"
    """
    import difflib

    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


class UnknownNameError(KeyError):
    """An unknown registry name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping from names to objects of one kind, filled with a decorator.

    ``loader(name)``: imports what registers ``name`` (None: everything) the first time a
    name is looked up, so that a registry of heavy modules costs nothing until it is used;
    it returns True once everything is loaded."""

    def __init__(self, kind: str, loader: Callable[[str | None], bool] | None = None) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._loader = loader
        self._complete = loader is None

    def set_loader(self, loader: Callable[[str | None], bool]) -> None:
        self._loader, self._complete = loader, False

    def _load(self, name: str | None = None) -> None:
        if self._complete or (name is not None and name in self._items):
            return
        assert self._loader is not None
        if self._loader(name):
            self._complete = True

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that files ``obj`` under ``name``; a second use of a name is an error."""

        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        self._load(name)
        try:
            return self._items[name]
        except KeyError:
            self._load()
            if name in self._items:
                return self._items[name]
            valid = ", ".join(sorted(self._items)) or "(none registered)"
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{suggest(name, self._items)}; valid names: {valid}"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self._load(name)
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        self._load()
        return len(self._items)


def check_options(kind: str, name: str, given: Mapping[str, Any], valid: Mapping[str, Any]
                  ) -> None:
    """Reject options that ``name`` does not take, listing the valid ones with their defaults.

    >>> check_options("model", "mlp", {"widht": 8}, {"width": 2048})
    Traceback (most recent call last):
    TypeError: model 'mlp' got unknown option(s) widht; valid options: width=2048
    """
    unknown = sorted(set(given) - set(valid))
    if unknown:
        raise TypeError(
            f"{kind} {name!r} got unknown option(s) {', '.join(unknown)}; valid options: "
            + (", ".join(f"{k}={v!r}" for k, v in valid.items()) or "(none)")
        )
