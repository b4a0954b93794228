"""Many processes, one result: calibration and evaluation split over a torch.distributed group.

Both jobs are embarrassingly parallel over samples. Inside an initialised process group (torchrun:
gloo on the CPU, NCCL on GPUs) the work is dealt out by *batch*: batch ``b`` of the calibration
chains, of the observer pass, of bias_correct and of evaluation sampling runs on rank
``b % world_size``, with randomness seeded by ``(seed, b)`` alone, so each batch is computed
exactly as one process computes it. The ranks then exchange their batches' results, and each
rank reduces them in batch order: the calibration set, the observers' min / max and bottom-k
reservoirs (their keys are seeded per batch too) and bias_correct's sums come out equal, tensor
for tensor, to what a single process gets (with the same threads per process).

Failure: every exchange is also a vote (``agree``): a rank whose share raised sends its error
instead of its results, and every rank then raises ``RankFailed`` naming it; a rank that dies
makes the collective fail on the others (gloo: closed connection; otherwise the group's timeout,
``init_from_env(timeout_s=...)``). Under torchrun the agent stops the remaining workers as soon
as one exits with an error.

Nothing here manages processes: torchrun does.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, Callable, Iterable

import torch

DEFAULT_TIMEOUT_S = 600


class RankFailed(RuntimeError):
    """Another rank (or this one) failed during a distributed phase."""


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    d = _dist()
    return d.get_rank() if d else 0


def world_size() -> int:
    d = _dist()
    return d.get_world_size() if d else 1


def is_main() -> bool:
    """Rank 0, or no process group: the process that writes files."""
    return rank() == 0


def init_from_env(timeout_s: float | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1 in the environment); a no-op
    otherwise or when a group exists. Backend: NCCL when CUDA is available (device from
    ``LOCAL_RANK``), else gloo. Returns whether this process is one of several ranks."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    timeout_s = float(os.environ.get("PTQ4DM_DIST_TIMEOUT", DEFAULT_TIMEOUT_S)) if timeout_s is None else timeout_s
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_world_size() > 1


def shutdown() -> None:
    d = _dist()
    if d is not None:
        d.destroy_process_group()


def batch_seed(seed: int, batch: int) -> int:
    """The seed of batch ``batch`` of a job seeded ``seed``: independent of how batches are dealt out."""
    h = hashlib.sha256(f"ptq4dm:{seed}:{batch}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def my_batches(items: Iterable) -> list[tuple[int, Any]]:
    """``(b, item)`` for the batches this rank computes: every ``world_size``-th, from its rank."""
    r, w = rank(), world_size()
    return [(b, it) for b, it in enumerate(items) if b % w == r]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def agree(phase: str, fn: Callable[[], Any]) -> list[Any]:
    """Run ``fn`` (this rank's share of ``phase``) and exchange its result with every rank.

    Returns the list of all ranks' results (rank order); one process: ``[fn()]``. If ``fn`` raised
    on any rank, every rank raises ``RankFailed`` naming the first failed rank and its error (the
    failed rank's own exception is chained). A rank that stopped answering raises ``RankFailed``
    on the others when the collective fails (gloo notices a closed connection; otherwise the
    process group's timeout)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return [fn()]
    err, out = None, None
    try:
        out = _to_cpu(fn())
    except Exception as e:   # noqa: BLE001 -- sent to the other ranks, then re-raised below
        err = e
    msg = None if err is None else f"{type(err).__name__}: {err}"
    gathered: list = [None] * d.get_world_size()
    try:
        d.all_gather_object(gathered, (msg, out if err is None else None))
    except Exception as e:   # noqa: BLE001
        raise RankFailed(f"{phase}: rank {d.get_rank()} lost contact with the other ranks ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); one of them died or stopped: see its log") from (err or e)
    failed = [(r, m) for r, (m, _) in enumerate(gathered) if m is not None]
    if failed:
        r, m = failed[0]
        raise RankFailed(f"{phase} failed on rank {r} of {d.get_world_size()}: {m}") from err
    return [o for _, o in gathered]


def gather_batches(phase: str, fn: Callable[[], dict[int, Any]]) -> dict[int, Any]:
    """``fn`` returns {batch index: result} for this rank's batches; every rank gets all of them,
    sorted by batch index."""
    merged: dict[int, Any] = {}
    for part in agree(phase, fn):
        merged.update(part)
    return dict(sorted(merged.items()))
