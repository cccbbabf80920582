"""Loss-landscape instruments for any PyTorch model: Hessian-vector products, trace, top
eigenvalues, spectral density, 1-D / 2-D loss surfaces, and per-layer sensitivities. Knows nothing of DNQ.

Example:
    >>> import torch, torch.nn as nn
    >>> import landscape
    >>> _ = torch.manual_seed(0)
    >>> X, y = torch.randn(20, 3), torch.randn(20, 1)
    >>> op = landscape.HessianOperator(nn.Linear(3, 1, bias=False), nn.functional.mse_loss, (X, y))
    >>> H = 2 * X.T @ X / 20  # the Hessian of this least-squares loss, in closed form
    >>> torch.allclose(op.matvec(torch.ones(3)), H @ torch.ones(3))
    True
    >>> eig = landscape.top_eigenvalues(op, k=1)
    >>> round(eig.eigenvalues[0], 4), round(torch.linalg.eigvalsh(H)[-1].item(), 4)
    (2.4721, 2.4721)
"""

import importlib

from .density import DensityResult, spectral_density
from .directions import (
                         Direction,
                         eigenvector_directions,
                         interpolation_direction,
                         quantization_direction,
                         random_directions,
)
from .eigen import EigenResult, power_iteration, top_eigenvalues
from .errors import ConvergenceError, ConvergenceWarning, NonFiniteError
from .hessian import HessianOperator
from .operator import BaseOperator, DataChangedError, ReductionWarning
from .planner import Choice, Planner
from .precision import full_precision
from .sensitivity import LayerSensitivityResult, error_moments, layer_sensitivity
from .surface import SurfaceResult, surface_1d, surface_2d
from .trace import (
                         BlockTraceResult,
                         LossIncreasePrediction,
                         TraceResult,
                         block_traces,
                         hessian_trace,
                         noise_weighted_trace,
                         predicted_loss_increase,
)

__version__ = "0.1.0"

__all__ = ["HessianOperator", "BaseOperator", "DataChangedError", "Planner", "Choice", "hessian_trace", "block_traces",
           "noise_weighted_trace", "predicted_loss_increase",
           "top_eigenvalues", "power_iteration", "spectral_density",
           "random_directions", "interpolation_direction", "quantization_direction", "eigenvector_directions",
           "Direction", "surface_1d", "surface_2d", "SurfaceResult", "TraceResult", "BlockTraceResult",
           "LossIncreasePrediction", "EigenResult", "DensityResult", "full_precision", "NonFiniteError",
           "layer_sensitivity", "error_moments", "LayerSensitivityResult", "ConvergenceWarning", "ConvergenceError",
           "ReductionWarning",
           "plot"]

#: submodules reachable as attributes after ``import landscape`` (imported on first use: plotly and
#: matplotlib are not loaded for users who only measure)
_LAZY = ("plot", "plot_static", "regress")


def __getattr__(name):
    if name in _LAZY:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'landscape' has no attribute {name!r}")
