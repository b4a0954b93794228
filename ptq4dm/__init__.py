"""ptq4dm: post-training quantization of diffusion models as compiler passes (PTQ4DM, CVPR 2023).

The facade re-exports what a user needs; the machinery lives in ptq4dm.ir, ptq4dm.passes,
ptq4dm.backends and ptq4dm.models.
"""

__version__ = "0.1.0"

from ptq4dm.api import (QuantReport, QuantResult, capture_step, compile_step, lower, quantize,  # noqa: E402
                        weights_hash)
from ptq4dm.ir.capture import CaptureError, capture  # noqa: E402
from ptq4dm.ir.graph import StepGraph  # noqa: E402
from ptq4dm.models.loading import load_default_unet, load_unet, trained_schedule  # noqa: E402
from ptq4dm.models.samplers import DDIMSampler, DDPMSampler, make_sampler  # noqa: E402
from ptq4dm.models.step import DiffusionStep, sample, trajectory  # noqa: E402
from ptq4dm.models.unets import build_unet  # noqa: E402
from ptq4dm.passes import (DEFAULT_PIPELINE, MSE, NDTC, MinMax, PassManager, QuantPolicy, RandomNoise,  # noqa: E402
                           Single, Uniform)

__all__ = ["__version__", "quantize", "lower", "compile_step", "capture", "capture_step", "CaptureError", "StepGraph", "QuantReport",
           "QuantResult", "weights_hash", "load_unet", "load_default_unet", "trained_schedule", "build_unet",
           "make_sampler",
           "DDPMSampler", "DDIMSampler", "DiffusionStep", "sample", "trajectory", "PassManager", "QuantPolicy",
           "NDTC", "Uniform", "Single", "RandomNoise", "MSE", "MinMax", "DEFAULT_PIPELINE"]
