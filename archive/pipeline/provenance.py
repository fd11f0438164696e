"""Provenance rows: which code, step, configuration and inputs made a product."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timezone

import numpy as np

import archive
from archive.catalog.ids import new_ids


def _plain(obj):
    """JSON-able form of configs (dataclasses, numpy scalars, tuples, paths)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def canonical_json(config) -> str:
    """Canonical JSON (sorted keys, no spaces) of a config; equal configs give equal text."""
    return json.dumps(_plain(config), sort_keys=True, separators=(",", ":"))


def provenance_row(step: str, config, inputs: list) -> dict:
    """A ``provenance`` row for ``step`` run with ``config`` on ``inputs`` (ids or paths)."""
    text = canonical_json(config)
    return {
        "provenance_id": int(new_ids(1)[0]),
        "code_version": archive.__version__,
        "step": step,
        "config": text,
        "config_hash": hashlib.sha256(text.encode()).hexdigest(),
        "inputs": json.dumps([str(i) for i in inputs]),
        "created": datetime.now(timezone.utc),
    }
