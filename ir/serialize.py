"""Atomic file writes for everything the IR and the tools write."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a temp file beside ``path``, then rename: no partial file is ever seen."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ----- the quantized artifact ---------------------------------------------------------------
#
# One safetensors file, loaded without executing code (no pickle):
#   tensors  "fp/<param>"        float parameters of the UNet that are not quantized
#            "w/<key>"           int8 (int16 above 8 bits) weight codes, per output channel
#            "w4/<key>"          weights of 4 bits or fewer: the codes two per byte (ir.quant.pack_int4),
#                                their shape in the spec's "shape"; "bits" in each spec is the grid's width
#            "wb/<key>"          weights of 5 to 7 bits: a bit stream of "bits" bits per code (ir.quant.pack_bits),
#                                their shape in the spec's "shape" (version 3)
#            "w_scale/<key>", "w_zp/<key>"   their scales / zero points
#            "a_scale/<key>", "a_zp/<key>"   activation / output ranges (tables if per-timestep)
#            "bc_table/<bias>"   bias_correct{groups=G}: the (G, C) correction added after the layer
#                                whose (corrected) bias is "fp/<bias>"; "bc_group_of_t": (T,) the group of each t
#   metadata "ptq4dm": JSON header: format version, unet and sampler config, policy, pipeline,
#            ptq4dm and torch versions, sha256 of the FP weights, per-tensor specs, and
#            "content_sha256" over the rest of the header and every stored tensor (detects corruption).

ARTIFACT_VERSION = 3  # 2: content_sha256 also covers the header; 3: 5- to 7-bit weights packed ("wb/")
READABLE_VERSIONS = (2, 3)   # a version-2 file is a version-3 file without "wb/" tensors


class ArtifactError(ValueError):
    """An artifact that cannot be loaded: named, with what to do."""


def _content_hash(tensors: dict, header: dict) -> str:
    """sha256 over the header (canonical JSON, without this hash) and every tensor."""
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in header.items() if k != "content_sha256"}, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode()); h.update(str(t.dtype).encode()); h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_artifact(path, tensors: dict, header: dict) -> int:
    """Write atomically; returns the file size in bytes."""
    import json

    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    header = {**header, "format": "ptq4dm-artifact", "version": ARTIFACT_VERSION}
    header["content_sha256"] = _content_hash(tensors, header)
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"ptq4dm": json.dumps(header, sort_keys=True)}))
    return Path(path).stat().st_size


def load_artifact(path) -> tuple[dict, dict]:
    """Read and check an artifact: (tensors, header). Raises ArtifactError with the reason."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact {str(path)!r} does not exist; make one with tools/quantize.py --out {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError / OSError / ValueError on bad bytes
        raise ArtifactError(f"{path} is not a readable safetensors file (truncated or corrupted?): "
                            f"{type(e).__name__}: {str(e)[:200]}") from None
    if "ptq4dm" not in meta:
        raise ArtifactError(f"{path} is a safetensors file but not a ptq4dm artifact (no 'ptq4dm' header)")
    try:
        header = json.loads(meta["ptq4dm"])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: the ptq4dm header is not valid JSON ({e}); the file is corrupted") from None
    if not isinstance(header, dict) or header.get("format") != "ptq4dm-artifact":
        raise ArtifactError(f"{path}: unknown artifact format")
    if header.get("version") not in READABLE_VERSIONS:
        raise ArtifactError(f"{path}: artifact version {header.get('version')} but this ptq4dm reads "
                            f"versions {', '.join(map(str, READABLE_VERSIONS))}; re-run tools/quantize.py")
    if _content_hash(tensors, header) != header.get("content_sha256"):
        raise ArtifactError(f"{path}: contents do not match the artifact's sha256: the file is corrupted")
    return tensors, header
