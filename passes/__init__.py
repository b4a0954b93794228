"""ptq4dm.passes: one pass per module, registered by name for textual pipelines.

    decompose_attention  SDPA -> matmul / softmax / matmul
    mark                 annotate what gets quantized (QuantPolicy)
    observe              insert observers on annotated activations
    calibrate            NDTC (or a baseline) calibration through the observers
    solve                MSE (or min-max) range solver -> qparams
    fakequant            the simulated quantized graph
    sensitivity          each quantized tensor's share of the step's error; widen{k}: the costliest activations to 16 bits
    reconstruct          learned rounding of the weights against the float layer outputs (AdaRound)
    chain_gains          the low-bit weights' per-channel scales fitted against short unrolled float chains (ours)
    bias_correct         empirical bias correction of quantized convs / linears (optional, not PTQ4DM's)
    noise_correct        per-step affine correction of the UNet output (PTQD-style; optional)
    error_feedback       carry x_{t-1}'s rounding residual into the next step (8-bit x_{t-1} on DDIM; optional)
    lower                int8 ops (reference on CPU, Triton on CUDA)
"""

from .base import (PASS_REGISTRY, Pass, PassContext, PassManager, PipelineError, VerificationError,
                   parse_pipeline, register_pass)
from .bias_correct import BiasCorrect
from .chain_gains import ChainGains
from .calibrate import NDTC, Calibrate, CalibrationSet, RandomNoise, Single, Uniform, make_calibration_set
from .decompose_attention import DecomposeAttention
from .error_feedback import ErrorFeedback
from .fakequant import FakeQuant
from .lower import Lower
from .mark import Mark, QuantPolicy
from .noise_correct import NoiseCorrect
from .observe import Observe, ReservoirObserver
from .reconstruct import Reconstruct
from .sensitivity import Sensitivity
from .solve import MSE, MinMax, Solve, TensorReport

DEFAULT_PIPELINE = "decompose_attention,mark,observe,calibrate,solve,fakequant"   # the paper's passes
PAPER_PIPELINE = DEFAULT_PIPELINE
RECOMMENDED_PIPELINE = PAPER_PIPELINE + ",sensitivity{widen=4,weights=false},reconstruct,bias_correct{groups=10}"
# the recommended pipeline of 2026-12-03 (before reconstruct joined it): ~2 minutes less to quantize the
# default model on 2 cores, further from FP on deterministic samplers (docs/results/history.md, "DDIM: where the W8A8 error comes from")
RECOMMENDED_FAST_PIPELINE = PAPER_PIPELINE + ",sensitivity{widen=4,weights=false},bias_correct{groups=10}"

# Named pipelines for ``ptq4dm.quantize(pipeline=...)``: the passes and the policy they are meant with
# (an explicit ``policy=`` still wins). "recommended" (the default of ``ptq4dm.quantize`` and of
# tools/quantize.py) is measured in docs/results.md
# ("DDIM"): the paper's passes, the sensitivity pass widening the 4 activations that cost the
# step's x_{t-1} the most to 16 bits (measured on the calibration set, so on the step's own sampler),
# learned rounding of the 8-bit weights (reconstruct: AdaRound, layer by layer against the float
# layer's output on the calibration set), bias correction per 1/10 of the sampler's steps, conv_in / conv_out
# and the time-embedding path (layers whose input depends on t alone) in float and the sampler's
# mean / variance / x_{t-1} at 16 bits. "ptq4dm-paper" is the paper's
# full setting: every conv / linear / attention matmul and the three outputs at 8 bits.
# "recommended-fast": "recommended" without reconstruct (the default of 2026-12-03).
PRESETS = {
    "recommended": (RECOMMENDED_PIPELINE, QuantPolicy(output_bits=16, keep_first_last_fp=True, time_path_fp=True)),
    "recommended-fast": (RECOMMENDED_FAST_PIPELINE,
                         QuantPolicy(output_bits=16, keep_first_last_fp=True, time_path_fp=True)),
    "ptq4dm-paper": (PAPER_PIPELINE, QuantPolicy()),
}

__all__ = ["PASS_REGISTRY", "Pass", "PassContext", "PassManager", "PipelineError", "VerificationError",
           "parse_pipeline", "register_pass", "NDTC", "Uniform", "Single", "RandomNoise", "Calibrate", "BiasCorrect",
           "CalibrationSet", "make_calibration_set", "DecomposeAttention", "FakeQuant", "Lower", "Mark", "QuantPolicy",
           "Observe", "ReservoirObserver", "MSE", "MinMax", "Solve", "TensorReport", "DEFAULT_PIPELINE",
           "PAPER_PIPELINE", "RECOMMENDED_PIPELINE", "RECOMMENDED_FAST_PIPELINE", "PRESETS", "NoiseCorrect", "Sensitivity", "Reconstruct",
           "ErrorFeedback", "ChainGains"]
