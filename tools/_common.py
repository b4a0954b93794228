"""Helpers shared by the tools/ scripts."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ptq4dm.ir.serialize import atomic_write, atomic_write_text  # noqa: F401  (re-exported)

REPO = Path(__file__).resolve().parent.parent


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
