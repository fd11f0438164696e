"""Image products as users fetch them: one product by what it is, and cutouts at a position.

:func:`find_image` names one registered product the way a Butler user does: by kind
and visit + detector (``calexp``, ``diff``, ``score``), tile (``coadd``, ``template``)
or both (``warp``, ``psf_warp``), with the band where a tile has several.
:func:`copy_image` writes the stored FITS file as it is (checked against its
registered SHA-256).  :func:`cutouts` cuts stamps around a sky position
(:mod:`archive.image.cutout`): from one exposure (``visit``), from every exposure
that covers the position, from a template tile, or, for ``kind="all"``, the three
stamps a broker's alert carries -- science (calexp), template and difference --
of one exposure on one pixel grid (the template resampled onto the calexp's
grid as the difference step did).  ``dia_source_id`` takes the position, the
exposure and the band from a DIASource.

Read-only: products are read (checksums verified), never written or registered.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid

import numpy as np
import pandas as pd

from archive.catalog.ids import exposure_id_of, visit_detector_of
from archive.errors import ArchiveError, NotFoundError, ValidationError
from archive.image.cutout import Cutout, Size, check_position, cutout, on_image, pixel_of
from archive.pipeline.products import IMAGE_KINDS, ProductStore, sha256_file
from archive.sky.projection import gnomonic

#: Kinds of one exposure, of one tile, of both.
EXPOSURE_KINDS = ("calexp", "diff", "score")
TILE_KINDS = ("coadd", "template")
WARP_KINDS = ("warp", "psf_warp")
#: What ``archive cutout --kind`` takes: ``all`` is calexp, template and diff of one exposure.
CUTOUT_KINDS = ("calexp", "diff", "template", "coadd", "all")
ALL_STAMPS = ("calexp", "template", "diff")
#: Largest visit / detector / tile number accepted (ids are int64).
_MAX_ID = 1 << 52


def _check_kind(kind: str, allowed=IMAGE_KINDS) -> str:
    if kind not in allowed:
        raise ArchiveError(f"unknown image kind {kind!r}; expected one of {', '.join(allowed)}")
    return kind


def _check_id(value, what: str, limit: int = _MAX_ID) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        try:
            if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
                value = int(value)
            else:
                raise ValueError
        except ValueError:
            raise ArchiveError(f"{what} {value!r} is not an integer") from None
    value = int(value)
    if not 0 <= value < limit:
        raise ArchiveError(f"{what} {value} is out of range (0 to {limit - 1})")
    return value


def _sql_kind(kind: str) -> str:
    return ("SELECT p.*, e.mjd_mid FROM image_product p LEFT JOIN exposure e ON e.exposure_id = p.exposure_id "
            f"WHERE p.kind = '{_check_kind(kind)}'")


def _products(store, kind: str, exposure_id: int | None = None, tile: int | None = None) -> pd.DataFrame:
    q = _sql_kind(kind)
    if exposure_id is not None:
        q += f" AND p.exposure_id = {int(exposure_id)}"
    if tile is not None:
        q += f" AND p.tile_id = {int(tile)}"
    return store.sql(q)


def _listing(values, n: int = 12) -> str:
    vals = sorted({int(v) for v in values if v is not None and not pd.isna(v)})
    if not vals:
        return "none"
    return ", ".join(map(str, vals[:n])) + (f", ... ({len(vals)} in all)" if len(vals) > n else "")


def _by_band(rows: pd.DataFrame, band: str | None, what: str) -> pd.Series:
    if band is not None:
        rows = rows[rows["band"] == band]
        if rows.empty:
            raise NotFoundError(f"no {what} in band {band!r}")
    if len(rows) > 1:
        raise ArchiveError(f"{what} exists in several bands ({', '.join(sorted(rows['band'].astype(str)))}): "
                           "give the band")
    return rows.iloc[0]


def find_image(store, kind: str, visit=None, detector=None, tile=None, band: str | None = None) -> pd.Series:
    """The ``image_product`` row of one product (see the module docstring); NotFoundError
    naming what exists where nothing matches."""
    _check_kind(kind)
    visit, detector, tile = _check_id(visit, "visit"), _check_id(detector, "detector"), _check_id(tile, "tile")
    if detector is not None and detector >= 1000:
        raise ArchiveError(f"detector {detector} is out of range (0 to 999)")
    if kind in EXPOSURE_KINDS or kind in WARP_KINDS:
        if visit is None:
            raise ArchiveError(f"a {kind} is found by visit (and detector): give the visit")
        if kind in WARP_KINDS and tile is None:
            raise ArchiveError(f"a {kind} is found by tile and visit: give the tile")
        rows = _products(store, kind, tile=tile)
        vd = [visit_detector_of(e) for e in rows["exposure_id"]]
        rows = rows.assign(_visit=[v for v, _ in vd], _det=[d for _, d in vd])
        here = rows[rows["_visit"] == visit]
        if here.empty:
            raise NotFoundError(f"no {kind} of visit {visit}" + (f" on tile {tile}" if tile is not None else "")
                                + f" (visits with a {kind}: {_listing(rows['_visit'])})")
        if detector is None:
            if here["_det"].nunique() > 1:
                raise ArchiveError(f"visit {visit} has a {kind} on several detectors "
                                   f"({_listing(here['_det'])}): give the detector")
        else:
            there = here[here["_det"] == detector]
            if there.empty:
                raise NotFoundError(f"no {kind} of visit {visit} detector {detector} "
                                    f"(detectors of that visit: {_listing(here['_det'])})")
            here = there
        what = f"{kind} of visit {visit}" + (f" detector {detector}" if detector is not None else "")
        return _by_band(here, band, what).drop(labels=["_visit", "_det"])
    # tile kinds
    if tile is None:
        raise ArchiveError(f"a {kind} is found by tile: give the tile "
                           f"(tiles with a {kind}: {_listing(_products(store, kind)['tile_id'])})")
    rows = _products(store, kind, tile=tile)
    if rows.empty:
        raise NotFoundError(f"no {kind} of tile {tile} "
                            f"(tiles with a {kind}: {_listing(_products(store, kind)['tile_id'])})")
    return _by_band(rows, band, f"{kind} of tile {tile}")


def copy_image(products: ProductStore, row: pd.Series, path: os.PathLike, overwrite: bool = False) -> pathlib.Path:
    """Copy the product file of ``row`` to ``path`` as stored (through a temporary name; the copy
    is checked against the registered SHA-256 before it takes its name)."""
    src = products.path(row["path"])
    if not src.is_file():
        raise NotFoundError(f"{src}: product file is missing")
    dst = pathlib.Path(path)
    if dst.is_dir():
        dst = dst / pathlib.PurePosixPath(str(row["path"])).name
    if dst.exists() and not overwrite:
        raise ArchiveError(f"{dst} exists (use --overwrite to replace it)")
    if not dst.parent.is_dir():
        raise ArchiveError(f"{dst.parent}: no such directory")
    if dst.resolve() == src.resolve():
        raise ArchiveError(f"{dst} is the stored product itself; the archive is read-only here")
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(src, tmp)
        if sha256_file(tmp) != row["sha256"]:
            raise ArchiveError(f"{src}: contents changed since registration (SHA-256 differs); not copied")
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return dst


# -- cutouts -------------------------------------------------------------------------------------
def _contains(footprint, ra: float, dec: float) -> bool:
    """Whether the convex footprint (JSON corners [[ra, dec], ...]) holds the position, on its
    tangent plane (edges, great circles, project to straight lines)."""
    if not isinstance(footprint, str):
        return False
    c = np.asarray(json.loads(footprint), float)
    x, y = gnomonic(c[:, 0], c[:, 1], ra, dec)
    x, y = np.asarray(x, float), np.asarray(y, float)
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        return False
    ex, ey = np.roll(x, -1) - x, np.roll(y, -1) - y
    cross = ex * (-y) - ey * (-x)
    tol = 1e-12
    return bool((cross >= -tol).all() or (cross <= tol).all())


def _source_cards(row: pd.Series) -> dict:
    cards = {"PRODKIND": (str(row["kind"]), "archive product kind cut from"),
             "PRODPATH": (str(row["path"]), ""),  # under the products root (long: no comment)
             "PRODSHA": (str(row["sha256"]), "")}  # its SHA-256
    if row.get("exposure_id") is not None and not pd.isna(row.get("exposure_id")):
        cards["EXPID"] = (int(row["exposure_id"]), "exposure id (visit * 1000 + detector)")
    if row.get("tile_id") is not None and not pd.isna(row.get("tile_id")):
        cards["TILEID"] = (int(row["tile_id"]), "sky tile id")
    return cards


def _stamp_of(products: ProductStore, row: pd.Series, ra: float, dec: float, size: Size, grid=None) -> Cutout:
    exp = products.read(row, verify=True)
    return cutout(exp, ra, dec, size, _source_cards(row), grid=grid)


def _covering(store, kind: str, ra: float, dec: float, band: str | None) -> pd.DataFrame:
    rows = _products(store, kind)
    if band is not None:
        rows = rows[rows["band"] == band]
    rows = rows[[_contains(f, ra, dec) for f in rows["footprint"]]] if len(rows) else rows
    return rows.sort_values(["mjd_mid", "exposure_id", "tile_id", "band"], na_position="last") \
        .reset_index(drop=True)


def _not_covered(kind: str, ra: float, dec: float, band: str | None) -> NotFoundError:
    return NotFoundError(f"no {kind} covers ({ra:.7f}, {dec:.7f})" + (f" in band {band!r}" if band else ""))


def _template_on_stamp(store, products: ProductStore, science: Cutout, calexp_row: pd.Series) -> Cutout:
    """The template tiles that overlap the calexp, resampled onto the science stamp's grid as the
    difference step resamples them onto the whole calexp (pixels no tile covers: NaN, NO_DATA)."""
    from archive.image.exposure import Exposure
    from archive.process.diffim.template import template_on_grid

    tpl_rows = products.find("template", band=str(calexp_row["band"]), overlapping=calexp_row)
    tpl_rows = tpl_rows.sort_values("tile_id").reset_index(drop=True)
    if tpl_rows.empty:
        raise NotFoundError(f"no template overlaps exposure {int(calexp_row['exposure_id'])} "
                            f"in band {calexp_row['band']!r}")
    templates = [products.read(r, verify=True) for _, r in tpl_rows.iterrows()]
    s = science.exposure
    grid = Exposure(np.zeros(s.shape, np.float32), wcs=s.wcs, info=s.info.copy(), mask_planes=s.mask_planes,
                    xy0=s.xy0)
    t = template_on_grid(grid, templates)
    no_data = (t.mask & np.int32(1 << t.mask_planes["NO_DATA"])) != 0
    t.image[no_data] = np.nan
    t.variance[no_data] = np.nan
    t.photo_calib = templates[0].photo_calib
    t.xy0 = s.xy0
    t.info.extras = {**t.info.extras, "template": {**t.info.extras.get("template", {}),
                                                  "tile_ids": [int(v) for v in tpl_rows["tile_id"]]}}
    cards = {"PRODKIND": ("template", "archive product kind cut from"),
             "RESAMPLD": (True, "template tiles resampled onto the science grid"),
             "TILEIDS": (",".join(str(int(v)) for v in tpl_rows["tile_id"]), "template tiles used"),
             "EXPID": (int(calexp_row["exposure_id"]), "exposure whose grid this is")}
    for i, r in tpl_rows.iterrows():
        if i < 10:
            cards[f"PRODSHA{i}"] = (str(r["sha256"]), "")  # SHA-256 of the i-th tile of TILEIDS
    return Cutout(t, science.ra, science.dec, science.x, science.y, int(no_data.sum()), cards)


def _best_tile(products: ProductStore, rows: pd.DataFrame, ra: float, dec: float):
    """Of tile products covering the position, the one where it lies farthest from an edge."""
    best = None
    for _, r in rows.iterrows():
        exp = products.read(r, verify=True)
        x, y = pixel_of(exp, ra, dec)
        if not on_image(exp, x, y):
            continue
        margin = min(x + 0.5, y + 0.5, exp.width - 0.5 - x, exp.height - 0.5 - y)
        if best is None or margin > best[0]:
            best = (margin, r, exp)
    return best


def cutouts(store, products: ProductStore, ra=None, dec=None, size: Size | float | str = 10.0,
            kind: str | None = None, visit=None, detector=None, tile=None, band: str | None = None,
            dia_source_id=None) -> list[Cutout]:
    """Stamps at (``ra``, ``dec``) (deg), ``size`` on a side (see the module docstring).

    ``kind`` (default ``calexp``; ``all`` with ``dia_source_id``): ``calexp`` or ``diff`` (of
    ``visit``, else of every exposure covering the position, in time order), ``template``
    (with ``visit``: resampled onto that exposure's grid; else the stored tile's own pixels,
    ``tile`` or the covering tile), ``coadd`` (a tile's), ``all`` (calexp, template, diff of one
    exposure, on one grid)."""
    size = Size.parse(size)
    visit, detector, tile = _check_id(visit, "visit"), _check_id(detector, "detector"), _check_id(tile, "tile")
    if dia_source_id is not None:
        sid = _check_id(dia_source_id, "dia_source id", 1 << 63)
        src = store.get("dia_source", [sid], ["dia_source_id", "ra", "dec", "exposure_id", "band"])
        if src.empty:
            raise NotFoundError(f"no dia_source with id {sid}")
        s = src.iloc[0]
        v, d = visit_detector_of(int(s["exposure_id"]))
        if (visit is not None and visit != v) or (detector is not None and detector != d):
            raise ArchiveError(f"dia_source {sid} is on visit {v} detector {d}, not the visit/detector given")
        if band is not None and band != s["band"]:
            raise ArchiveError(f"dia_source {sid} is in band {s['band']!r}, not {band!r}")
        visit, detector, band = v, d, str(s["band"])
        if ra is None and dec is None:
            ra, dec = float(s["ra"]), float(s["dec"])
        kind = kind or "all"
    kind = _check_kind(kind or "calexp", CUTOUT_KINDS)
    if ra is None or dec is None:
        raise ArchiveError("give the position (RA and Dec in degrees) or a dia_source id")
    ra, dec = check_position(ra, dec)

    if kind in ("coadd",) or (kind == "template" and visit is None):
        if tile is not None:
            row = find_image(store, kind, tile=tile, band=band)
            return [_stamp_of(products, row, ra, dec, size)]
        rows = _covering(store, kind, ra, dec, band)
        best = _best_tile(products, rows, ra, dec)
        if best is None:
            raise _not_covered(kind, ra, dec, band)
        _, row, exp = best
        return [cutout(exp, ra, dec, size, _source_cards(row))]

    if kind == "all" and visit is None:
        raise ArchiveError("--kind all gives the science, template and difference stamps of one exposure: "
                           "give the visit (or a dia_source id)")
    base = "diff" if kind == "diff" else "calexp"
    if visit is not None:
        rows = pd.DataFrame([find_image(store, base, visit=visit, detector=detector, band=band)])
    else:
        rows = _covering(store, base, ra, dec, band)
    out = []
    for _, row in rows.iterrows():
        exp = products.read(row, verify=True)
        x, y = pixel_of(exp, ra, dec)
        if not on_image(exp, x, y):
            if visit is not None:
                raise ValidationError(f"({ra:.7f}, {dec:.7f}) is not on the {base} of visit {visit} "
                                      f"(it maps to pixel ({x:.1f}, {y:.1f}) of {exp.width} x {exp.height})")
            continue
        sci = cutout(exp, ra, dec, size, _source_cards(row))
        if kind in ("calexp", "diff"):
            out.append(sci)
            continue
        stamps = {"calexp": sci, "template": _template_on_stamp(store, products, sci, row)}
        if kind == "all":
            diff_row = find_image(store, "diff", visit=visit, detector=visit_detector_of(int(row["exposure_id"]))[1],
                                  band=str(row["band"]))
            x0, y0 = sci.exposure.xy0
            n = sci.exposure.shape
            stamps["diff"] = _stamp_of(products, diff_row, ra, dec, size, grid=(x0, y0, n[1], n[0]))
            out += [stamps[k] for k in ALL_STAMPS]
        else:
            out.append(stamps["template"])
    if not out:
        raise _not_covered(base, ra, dec, band)
    return out


def stamp_name(c: Cutout) -> str:
    """A file name for a stamp: kind and the exposure or tile it comes from."""
    kind = c.source.get("PRODKIND", ("stamp",))[0]
    if "EXPID" in c.source:
        v, d = visit_detector_of(int(c.source["EXPID"][0]))
        return f"{kind}_v{v:06d}_d{d:02d}.fits"
    if "TILEID" in c.source:
        return f"{kind}_t{int(c.source['TILEID'][0]):07d}.fits"
    return f"{kind}.fits"


__all__ = ["CUTOUT_KINDS", "copy_image", "cutouts", "exposure_id_of", "find_image", "stamp_name"]
