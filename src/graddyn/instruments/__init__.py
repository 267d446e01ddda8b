"""Instruments: pure functions and thin ``update / compute`` classes with declared state that
turn per-example gradients into numbers. See ``_base.py`` for the contract.

Registered names: coherence, batch_coherence, confusion, stiffness, gsnr, group_split,
learned_at, spectrum, margin.
"""

from graddyn.instruments._base import INSTRUMENTS, Instrument, Probe, empty_error, require_grads
from graddyn.instruments.coherence import (
    BatchCoherence,
    Coherence,
    coherence_from_gram,
    coherence_from_sums,
)
from graddyn.instruments.confusion import (
    Confusion,
    confusion_from_gram,
    confusion_from_vectors,
    minibatch_gradient,
    pairwise_cosines,
)
from graddyn.instruments.group_split import GroupSplit, split_from_gram
from graddyn.instruments.gsnr import GSNR, gsnr_from_state, gsnr_state_update
from graddyn.instruments.learned_at import LearnedAt, learned_at_steps
from graddyn.instruments.margin import NormalizedMargin
from graddyn.instruments.spectrum import Spectrum
from graddyn.instruments.stiffness import Stiffness, stiffness_from_sums, stiffness_sums

__all__ = [
    "GSNR",
    "INSTRUMENTS",
    "BatchCoherence",
    "Coherence",
    "Confusion",
    "GroupSplit",
    "Instrument",
    "LearnedAt",
    "NormalizedMargin",
    "Probe",
    "Spectrum",
    "Stiffness",
    "coherence_from_gram",
    "coherence_from_sums",
    "confusion_from_gram",
    "confusion_from_vectors",
    "empty_error",
    "gsnr_from_state",
    "gsnr_state_update",
    "learned_at_steps",
    "minibatch_gradient",
    "pairwise_cosines",
    "require_grads",
    "split_from_gram",
    "stiffness_from_sums",
    "stiffness_sums",
]
