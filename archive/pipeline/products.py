"""Image products on disk: a directory layout keyed by ids, written atomically, checksummed."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib

import numpy as np

from archive.image.exposure import Exposure
from archive.sky.healpix import radec_to_healpix29


def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def product_path(kind: str, visit: int, detector: int, band: str = "") -> pathlib.Path:
    """Relative path of a per-exposure product, e.g. ``calexp/r/v000012/calexp_v000012_d03.fits``."""
    return pathlib.Path(kind) / (band or "_") / f"v{visit:06d}" / f"{kind}_v{visit:06d}_d{detector:02d}.fits"


def footprint(exposure: Exposure) -> tuple[float, float, str]:
    """Centre (ra, dec) and the outer pixel corners (JSON [[ra, dec], ...]) of an exposure."""
    corners = [[float(a) % 360.0, float(d)] for a, d in exposure.corners_sky()]
    cra, cdec = exposure.center_sky()
    return cra % 360.0, cdec, json.dumps(corners)


def write_product(root: os.PathLike, rel: pathlib.Path, exposure: Exposure) -> tuple[pathlib.Path, str, int]:
    """Write ``exposure`` to ``root/rel`` atomically (temp file + rename); returns (path, sha256, size)."""
    path = pathlib.Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    exposure.writeto(tmp)
    digest = sha256_file(tmp)
    size = tmp.stat().st_size
    os.replace(tmp, path)
    return path, digest, size


def image_product_row(product_id: int, kind: str, rel: pathlib.Path, digest: str, size: int,
                      exposure: Exposure, exposure_id: int | None, provenance_id: int) -> dict:
    ra, dec, corners = footprint(exposure)
    return {"product_id": product_id, "exposure_id": exposure_id, "tile_id": None, "kind": kind,
            "band": exposure.info.band, "path": str(rel), "sha256": digest, "size_bytes": size,
            "ra": ra, "dec": dec, "healpix29": int(radec_to_healpix29(np.array([ra]), np.array([dec]))[0]),
            "footprint": corners, "provenance_id": provenance_id}
