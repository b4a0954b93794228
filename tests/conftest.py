import os

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton's interpreter runs the int8 kernels on the CPU (tests/test_lowering.py); with a GPU the
# kernels compile for it instead (tests/test_cuda.py), and the interpreter tests skip
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("ci", max_examples=15, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("thorough", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
# under pytest-xdist (make test: one worker per core) each worker gets its share of the cores
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _workers)))


@pytest.fixture(scope="session")
def tiny_unet():
    from ptq4dm.models.unets import build_unet

    torch.manual_seed(0)
    return build_unet("tiny").eval()


@pytest.fixture(scope="session")
def cifar_unet():
    from ptq4dm.models.unets import build_unet

    torch.manual_seed(0)
    return build_unet("ddpm-cifar10").eval()


def load_tool(name: str):
    """Import tools/<name>.py (a script, not a package module) for calling its functions in a test."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"ptq4dm_{name}_tool", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod   # dataclasses in the tool look their module up here
    spec.loader.exec_module(mod)
    return mod


def step_x_error(result, step, n=32, seed=5) -> float:
    """Relative squared error of x_{t-1} of a quantized graph against the float step, on random
    x_t and timesteps (the same for every call with the same seed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *step.sample_shape(1)[1:]), generator=g)
    t = step.sampler.timesteps[torch.randint(0, step.sampler.S, (n,), generator=g)]
    noise = torch.randn(x.shape, generator=g)
    with torch.no_grad():
        ref = step(x, t, noise)[0]
        out = result.graph(x, t, noise)[0]
    return float((out - ref).pow(2).sum() / ref.pow(2).sum())
