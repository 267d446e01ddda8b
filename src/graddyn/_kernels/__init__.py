"""Every compiled (numba) kernel of graddyn, behind one switch.

Each kernel is the single fast path of a computation whose plain reference lives with its
caller (and is what runs when the kernel does not apply); tests compare the two in float64:

- ``pairs_jit``: the instruments' pair statistics of a (B, B) Gram (cosines, stiffness
  class-pair sums, confusion quantiles); references in ``graddyn._gram`` and
  ``graddyn.instruments``. Handed out by ``pair_kernels()``.
- ``winsorize_jit`` (torch-facing: ``winsorize``): the extremes correction of the
  winsorized mean; reference ``graddyn._robust``. Callers check ``winsorize.usable(...)``.

The switch: ``ENABLED`` (environment ``GRADDYN_NO_KERNEL=1`` sets it False) sends every
caller to its reference. Why compiled at all: ``docs/benchmarks_overhead.md`` (pair
statistics, every measured step) and ``docs/benchmarks_winsorize.md`` (winsorized SGD).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from types import ModuleType


def enabled_by_env(environ: Mapping[str, str] = os.environ) -> bool:
    """False when ``GRADDYN_NO_KERNEL`` is set to anything but "" or "0"."""
    return environ.get("GRADDYN_NO_KERNEL", "").strip() in ("", "0")


ENABLED = enabled_by_env()
"""The one switch: False sends every computation to its reference."""

_pairs: list[ModuleType | None] = []  # [module or None] once tried


def pair_kernels() -> ModuleType | None:
    """The compiled pair statistics (``pairs_jit``), or None when switched off or numba cannot
    import / compile them (one warning). The first call compiles them, or loads numba's
    on-disk cache."""
    if not ENABLED:
        return None
    if not _pairs:
        import numpy as np

        try:
            from graddyn._kernels import pairs_jit as jit

            g, c = jit.gram_and_cosines(np.eye(2)[None])  # a tiny real call of each kernel
            g.flags.writeable = c.flags.writeable = False  # as host_pairs gives them
            jit.gram_and_cosines(np.eye(2, dtype=np.float32)[None])
            jit.stiffness_means(jit.stiffness_sums(g, c, np.zeros(2, np.int64), 1))
            jit.confusion_numbers(np.zeros(1), np.zeros(1), np.array([0.5]), 2)
        except ImportError:
            jit = None
        except Exception as err:  # a numba that cannot compile them: the references
            warnings.warn(f"graddyn: compiled pair statistics unavailable ({err!r}); using "
                          "NumPy", stacklevel=2)
            jit = None
        _pairs.append(jit)
    return _pairs[0]
