"""Provenance rows: which code, step, configuration and inputs made a product."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from archive.catalog.ids import new_ids
from archive.pipeline.config import config_hash, config_to_json
from archive.version import __version__


def provenance_row(step: str, config, inputs: list) -> dict:
    """A ``provenance`` row for ``step`` run with ``config`` on ``inputs`` (ids or paths)."""
    return {
        "provenance_id": int(new_ids(1)[0]),
        "code_version": __version__,
        "step": step,
        "config": config_to_json(config),
        "config_hash": config_hash(config),
        "inputs": json.dumps([str(i) for i in inputs]),
        "created": datetime.now(timezone.utc),
    }
