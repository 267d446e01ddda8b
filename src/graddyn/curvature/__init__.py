"""Curvature of a loss: Hessian operators and the estimators that read them.

Operators apply the Hessian to many random vectors at once (forward-over-reverse, vmapped);
estimators take an explicit ``(P, P)`` tensor, an operator, or a callable mat-mat, so the
same function is tested on a 10x10 matrix and used on a network::

    op = HessianOperator(model, F.cross_entropy, (x, y), params=["fc2.weight", "fc2.bias"])
    hutchinson_trace(op, max_vectors=200, rtol=0.01)   # TraceEstimate(value, std_error, ...)
    exact_trace(op)                   # piecewise-linear nets (ReLU, ...): exact, no random vectors
    ggn_hutchinson_trace(op, 100)     # piecewise-linear nets: Hutchinson from J z only
    lanczos_eigenvalue(op, tol=1e-3)  # EigenEstimate: top eigenvalue to relative error ~tol
    top_eigenvalues(op, k=3)                          # SciPy eigsh (Lanczos) on op.to_scipy()

Flattening: vectors concatenate ``p.flatten()`` over the selected parameters in
``model.named_parameters()`` order (``op.names``, ``op.unflatten``).
"""

from graddyn.curvature._eigen import power_iteration, top_eigenvalues
from graddyn.curvature._exact import exact_trace
from graddyn.curvature._ggn_trace import ggn_hutchinson_trace
from graddyn.curvature._lanczos import EigenEstimate, lanczos_eigenvalue, lanczos_tridiag
from graddyn.curvature._linearity import NotPiecewiseLinearError
from graddyn.curvature._matmat import Operator
from graddyn.curvature._operator import HessianOperator, dense_hessian
from graddyn.curvature._slq import slq_nodes_weights, spectral_density
from graddyn.curvature._trace import TraceEstimate, hutchinson_trace, hutchpp_trace

__all__ = [
    "EigenEstimate",
    "HessianOperator",
    "NotPiecewiseLinearError",
    "Operator",
    "TraceEstimate",
    "dense_hessian",
    "exact_trace",
    "ggn_hutchinson_trace",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos_eigenvalue",
    "lanczos_tridiag",
    "power_iteration",
    "slq_nodes_weights",
    "spectral_density",
    "top_eigenvalues",
]
