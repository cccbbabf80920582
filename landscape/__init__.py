"""Loss-landscape instruments for any PyTorch model: Hessian-vector products, trace, top
eigenvalues, spectral density (and, next, loss surfaces). Knows nothing of DNQ."""

from .density import DensityResult, spectral_density
from .eigen import EigenResult, power_iteration, top_eigenvalues
from .hessian import HessianOperator
from .trace import (BlockTraceResult, LossIncreasePrediction, TraceResult, block_traces, hessian_trace,
                    noise_weighted_trace, predicted_loss_increase)

__version__ = "0.1.0"

__all__ = ["HessianOperator", "hessian_trace", "block_traces", "noise_weighted_trace", "predicted_loss_increase",
           "top_eigenvalues", "power_iteration", "spectral_density", "TraceResult", "BlockTraceResult",
           "LossIncreasePrediction", "EigenResult", "DensityResult"]
