"""Image products: typed references, their files on disk and their ``image_product`` rows.

A :class:`ProductRef` names one image product by what it is, not where it
lies: its kind (``calexp``, ``warp``, ``coadd``, ``template``, ``diff``…), band,
and the exposure (``exposure_id``) or sky tile (``tile_id``) it belongs to (a
warp has both).  :class:`ProductStore` maps a reference to its path under the
products root, writes files atomically (temporary name, ``fsync``, rename)
with their SHA-256, builds their ``image_product`` rows, reads them back as
:class:`~archive.image.exposure.Exposure` objects (optionally verifying the
checksum), and finds registered products by kind, band, sky region or
overlap with another footprint, or by stale provenance.

The product store writes files only; rows are written by the pipeline's
driver (:mod:`archive.pipeline.runner`) in the same store transaction as the
rest of a unit's results.  Paths are relative to the products root::

    calexp/r/v000012/calexp_v000012_d03.fits          per exposure (visit 12, detector 3)
    warp/r/t0001234/warp_t0001234_v000012_d03.fits    per tile and exposure
    coadd/r/t0001234/coadd_t0001234.fits              per tile
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import uuid

import numpy as np
import pandas as pd

from archive.catalog.ids import exposure_id_of, visit_detector_of  # noqa: F401  (re-exported)
from archive.errors import ArchiveError, NotFoundError
from archive.image.exposure import Exposure
from archive.sky.healpix import radec_to_healpix29, radec_to_vec, vec_to_radec
from archive.sky.projection import gnomonic

#: Product kinds the archive knows: images (FITS) and per-exposure source catalogs (Parquet).
IMAGE_KINDS = ("calexp", "warp", "psf_warp", "coadd", "template", "diff", "score")
TABLE_KINDS = ("src",)
KINDS = IMAGE_KINDS + TABLE_KINDS


def sha256_file(path: os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class ProductRef:
    """What an image product is: kind, band, and its exposure and/or sky tile."""

    kind: str
    band: str
    exposure_id: int | None = None
    tile_id: int | None = None
    #: a version label in the file name, for a product rewritten by a later step (the new
    #: file gets a new name, so the registered one stays intact until the rows switch)
    tag: str = ""

    def __post_init__(self) -> None:
        if self.tag and not self.tag.replace("-", "").isalnum():
            raise ArchiveError(f"product tag {self.tag!r}: letters, digits and '-' only")
        if self.kind not in KINDS:
            raise ArchiveError(f"unknown product kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.exposure_id is None and self.tile_id is None:
            raise ArchiveError(f"a {self.kind} product needs an exposure_id or a tile_id")
        if not self.band or "/" in self.band or self.band.startswith("."):
            raise ArchiveError(f"product band {self.band!r} is not a valid band name")

    @property
    def rel_path(self) -> pathlib.PurePosixPath:
        """Path relative to the products root (see the module docstring)."""
        parts = [self.kind, self.band]
        stem = [self.kind]
        if self.tile_id is not None:
            parts.append(f"t{self.tile_id:07d}")
            stem.append(f"t{self.tile_id:07d}")
        if self.exposure_id is not None:
            visit, det = visit_detector_of(self.exposure_id)
            if self.tile_id is None:
                parts.append(f"v{visit:06d}")
            stem += [f"v{visit:06d}", f"d{det:02d}"]
        if self.tag:
            stem.append(self.tag)
        suffix = ".parquet" if self.kind in TABLE_KINDS else ".fits"
        return pathlib.PurePosixPath(*parts, "_".join(stem) + suffix)

    @classmethod
    def from_row(cls, row) -> ProductRef:
        """The reference of an ``image_product`` row (a mapping or a pandas row)."""
        def opt(v):
            return None if v is None or pd.isna(v) else int(v)

        stem = pathlib.PurePosixPath(str(row["path"])).stem
        ref = cls(str(row["kind"]), str(row["band"]), opt(row["exposure_id"]), opt(row["tile_id"]))
        tag = stem[len(pathlib.PurePosixPath(ref.rel_path).stem) + 1:]
        return dataclasses.replace(ref, tag=tag) if tag else ref


@dataclasses.dataclass(frozen=True)
class WrittenProduct:
    """A product file as written: its reference, path relative to the root, checksum, size
    and the sky footprint of the exposure in it (centre and corners, degrees)."""

    ref: ProductRef
    rel: str
    sha256: str
    size: int
    ra: float
    dec: float
    corners: str  # JSON [[ra, dec], ...] of the outer pixel corners

    def row(self, product_id: int, provenance_id: int | None) -> dict:
        """The ``image_product`` row of this file."""
        return {"product_id": int(product_id), "exposure_id": self.ref.exposure_id, "tile_id": self.ref.tile_id,
                "kind": self.ref.kind, "band": self.ref.band, "path": self.rel, "sha256": self.sha256,
                "size_bytes": int(self.size), "ra": self.ra, "dec": self.dec,
                "healpix29": int(radec_to_healpix29(np.array([self.ra]), np.array([self.dec]))[0]),
                "footprint": self.corners, "provenance_id": provenance_id}


def footprint(exposure: Exposure) -> tuple[float, float, str]:
    """Centre (ra, dec) and the outer pixel corners (JSON [[ra, dec], ...]) of an exposure."""
    corners = [[float(a) % 360.0, float(d)] for a, d in exposure.corners_sky()]
    cra, cdec = exposure.center_sky()
    return cra % 360.0, cdec, json.dumps(corners)


class ProductStore:
    """Image product files under ``root`` and queries over their registered rows in ``catalog``.

    ``catalog`` may be None for a worker that only writes and reads files.
    """

    def __init__(self, root: os.PathLike, catalog=None) -> None:
        self.root = pathlib.Path(root)
        self.catalog = catalog

    # -- files -------------------------------------------------------------
    def path(self, ref: ProductRef | str) -> pathlib.Path:
        rel = ref.rel_path if isinstance(ref, ProductRef) else pathlib.PurePosixPath(ref)
        if rel.is_absolute() or ".." in rel.parts:
            raise ArchiveError(f"product path {str(rel)!r} must be relative to the products root, without '..'")
        return self.root / rel

    def write(self, ref: ProductRef, exposure: Exposure, extra_hdus: list | None = None) -> WrittenProduct:
        """Write ``exposure`` as ``ref`` atomically: a reader sees the old file or the
        whole new one, never part of it, and a crash leaves at most a hidden temporary.
        ``extra_hdus``: further HDUs appended after the exposure's (e.g. a coadd's N_IMAGE)."""
        if ref.kind not in IMAGE_KINDS:
            raise ArchiveError(f"{ref.kind} is not an image product")
        if not extra_hdus:
            return self._write(ref, exposure.writeto, exposure)

        def writer(tmp):
            hdul = exposure.to_hdulist()
            for h in extra_hdus:
                hdul.append(h)
            for hdu in hdul:  # fixed checksum comments: the same product gives the same bytes
                hdu.add_checksum(when="archive.image checksum")
            hdul.writeto(tmp, output_verify="exception")

        return self._write(ref, writer, exposure)

    def write_table(self, ref: ProductRef, table: pd.DataFrame, footprint_of: Exposure) -> WrittenProduct:
        """Write a source catalog (Parquet) as ``ref`` atomically; its registered footprint
        is that of the exposure it was measured on."""
        if ref.kind not in TABLE_KINDS:
            raise ArchiveError(f"{ref.kind} is not a table product")
        return self._write(ref, lambda tmp: table.to_parquet(tmp, index=False), footprint_of)

    def read_table(self, what: ProductRef | str | pd.Series | dict) -> pd.DataFrame:
        """A table product (e.g. a ``src`` catalog) as a DataFrame."""
        rel = what["path"] if isinstance(what, (pd.Series, dict)) else what
        path = self.path(rel)
        if not path.is_file():
            raise NotFoundError(f"{path}: product file is missing")
        return pd.read_parquet(path)

    def _write(self, ref: ProductRef, writer, exposure: Exposure) -> WrittenProduct:
        path = self.path(ref)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            writer(tmp)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            digest = sha256_file(tmp)
            size = tmp.stat().st_size
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        ra, dec, corners = footprint(exposure)
        return WrittenProduct(ref, str(ref.rel_path), digest, size, ra, dec, corners)

    def read(self, what: ProductRef | str | pd.Series | dict, verify: bool = False) -> Exposure:
        """The product as an Exposure: by reference, relative path or ``image_product`` row.

        ``verify``: check the file against the row's SHA-256 (rows only) and refuse a
        file that changed since it was registered."""
        row = what if isinstance(what, (pd.Series, dict)) else None
        rel = row["path"] if row is not None else what
        path = self.path(rel) if not isinstance(rel, ProductRef) else self.path(rel)
        if not path.is_file():
            raise NotFoundError(f"{path}: product file is missing")
        if verify and row is not None and sha256_file(path) != row["sha256"]:
            raise ArchiveError(f"{path}: contents changed since registration (SHA-256 differs)")
        return Exposure.read(path)

    def remove(self, ref: ProductRef | str) -> None:
        self.path(ref).unlink(missing_ok=True)

    # -- queries over registered products ------------------------------------
    def _need_catalog(self):
        if self.catalog is None:
            raise ArchiveError("this product store has no catalog to query")
        return self.catalog

    def find(self, kind: str, band: str | None = None, region=None, overlapping=None,
             exposure_ids=None, tile_ids=None) -> pd.DataFrame:
        """Registered products of ``kind`` (``image_product`` rows), optionally of one band,
        of given exposures or tiles, whose centre lies in ``region`` (an
        :mod:`archive.sky.regions` region), or whose footprint overlaps ``overlapping``
        (an Exposure, a WrittenProduct, an ``image_product`` row, or corners as an
        (n, 2) array of ra, dec in degrees)."""
        cat = self._need_catalog()
        if region is not None:
            rows = cat.query_region("image_product", region)
        else:
            rows = cat.sql("SELECT * FROM image_product WHERE kind = " + _sql_literal(kind))
        rows = rows[rows["kind"] == kind]
        if band is not None:
            rows = rows[rows["band"] == band]
        if exposure_ids is not None:
            rows = rows[rows["exposure_id"].isin(list(exposure_ids))]
        if tile_ids is not None:
            rows = rows[rows["tile_id"].isin(list(tile_ids))]
        if overlapping is not None and len(rows):
            target = corners_of(overlapping)
            keep = [footprints_overlap(target, np.asarray(json.loads(f), float)) if isinstance(f, str) else False
                    for f in rows["footprint"]]
            rows = rows[np.asarray(keep, bool)]
        return rows.reset_index(drop=True)

    def stale(self, kind: str, config_hash: str, code_version: str | None = None) -> pd.DataFrame:
        """Registered products of ``kind`` whose provenance differs from ``config_hash``
        (or, when given, from ``code_version``): they would be made differently now."""
        cat = self._need_catalog()
        rows = cat.sql("SELECT p.*, v.config_hash, v.code_version FROM image_product p "
                       "LEFT JOIN provenance v ON v.provenance_id = p.provenance_id "
                       "WHERE p.kind = " + _sql_literal(kind))
        bad = rows["config_hash"].ne(config_hash)
        if code_version is not None:
            bad |= rows["code_version"].ne(code_version)
        return rows[bad.fillna(True)].reset_index(drop=True)


def _sql_literal(text: str) -> str:
    return "'" + str(text).replace("'", "''") + "'"


def corners_of(thing) -> np.ndarray:
    """Footprint corners (n, 2) [ra, dec] in degrees of an Exposure, WrittenProduct,
    ``image_product`` row or array."""
    if isinstance(thing, Exposure):
        return np.asarray(thing.corners_sky(), float)
    if isinstance(thing, WrittenProduct):
        return np.asarray(json.loads(thing.corners), float)
    if isinstance(thing, (pd.Series, dict)):
        return np.asarray(json.loads(thing["footprint"]), float)
    arr = np.asarray(thing, float)
    if arr.ndim != 2 or arr.shape[1] != 2 or len(arr) < 3:
        raise ArchiveError("a footprint is an (n >= 3, 2) array of [ra, dec] corners in degrees")
    return arr


def footprints_overlap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two convex sky polygons (corners [ra, dec] in degrees) overlap.

    Both are projected gnomonically about the midpoint of their centres (exact for
    great-circle edges, which project to straight lines) and tested with the
    separating-axis theorem."""
    centre = radec_to_vec(np.vstack([a, b])[:, 0], np.vstack([a, b])[:, 1]).mean(axis=0)
    ra0, dec0 = (float(v) for v in vec_to_radec(centre))
    pa = np.column_stack(gnomonic(a[:, 0], a[:, 1], ra0, dec0))
    pb = np.column_stack(gnomonic(b[:, 0], b[:, 1], ra0, dec0))
    if not (np.isfinite(pa).all() and np.isfinite(pb).all()):
        return False  # a polygon reaches the far hemisphere: not near each other
    for poly in (pa, pb):
        edges = np.roll(poly, -1, axis=0) - poly
        normals = np.column_stack([-edges[:, 1], edges[:, 0]])
        sa, sb = pa @ normals.T, pb @ normals.T
        if np.any((sa.max(axis=0) < sb.min(axis=0)) | (sb.max(axis=0) < sa.min(axis=0))):
            return False
    return True
