"""ptq4dm.passes: one pass per module, registered by name for textual pipelines.

    decompose_attention  SDPA -> matmul / softmax / matmul
    mark                 annotate what gets quantized (QuantPolicy)
    observe              insert observers on annotated activations
    calibrate            NDTC (or a baseline) calibration through the observers
    solve                MSE (or min-max) range solver -> qparams
    fakequant            the simulated quantized graph
    bias_correct         empirical bias correction of quantized convs / linears (optional, not PTQ4DM's)
    lower                int8 ops (reference on CPU, Triton on CUDA)
"""

from .base import (PASS_REGISTRY, Pass, PassContext, PassManager, PipelineError, VerificationError,
                   parse_pipeline, register_pass)
from .bias_correct import BiasCorrect
from .calibrate import NDTC, Calibrate, CalibrationSet, RandomNoise, Single, Uniform, make_calibration_set
from .decompose_attention import DecomposeAttention
from .fakequant import FakeQuant
from .lower import Lower
from .mark import Mark, QuantPolicy
from .observe import Observe, ReservoirObserver
from .solve import MSE, MinMax, Solve, TensorReport

DEFAULT_PIPELINE = "decompose_attention,mark,observe,calibrate,solve,fakequant"

__all__ = ["PASS_REGISTRY", "Pass", "PassContext", "PassManager", "PipelineError", "VerificationError",
           "parse_pipeline", "register_pass", "NDTC", "Uniform", "Single", "RandomNoise", "Calibrate", "BiasCorrect",
           "CalibrationSet", "make_calibration_set", "DecomposeAttention", "FakeQuant", "Lower", "Mark", "QuantPolicy",
           "Observe", "ReservoirObserver", "MSE", "MinMax", "Solve", "TensorReport", "DEFAULT_PIPELINE"]
