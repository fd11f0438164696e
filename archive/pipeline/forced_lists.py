"""Forced photometry at any list of positions, as steps of ``archive run``.

``template_catalog`` (one unit per template: tile and band)
    The static sources of the template, detected and measured once
    (:func:`archive.process.characterize.run`, as the ``sources`` step measures calexps;
    no cosmic-ray search on a coadd) into ``template_source``.  ``is_primary`` is true for
    the copy whose position lies in its own tile's core (the tile's HEALPix pixel), so the
    copies that overlapping tiles both hold are counted once.
``template_forced`` (one unit per exposure with a difference image)
    PSF fluxes at every primary template source of the exposure's band inside the
    difference image's footprint, on the difference, whether or not anything was detected
    there (dia_pipe's ``forcedPhotCcdTemplateDia``), into ``template_forced_source``.
``dia_template`` (one unit per template)
    PSF fluxes on the template at the positions of the DIAObjects (and DIASources) on the
    tile (dia_pipe's two template modes), into ``dia_template_source`` with ``image =
    'template'``: template flux + difference flux puts a light curve on an absolute scale.
``forced_list`` (one unit per registered list and processed exposure)
    A user's list (``archive forced --list``, :func:`register_list`) measured on every
    calexp and, when the list asks, on every difference image, into ``list_forced_source``
    (``forced`` true, tied to the list's ids).  Recentring follows LAST's rule (at most
    0.2 px in at most two iterations, :class:`archive.process.forced.ForcedConfig`) on the
    calexp; the difference is measured at the calexp's final position.

Every unit's inputs are checksums and digests of positions (never row ids, drawn anew by
each run); recording a unit replaces its earlier rows, so re-runs never duplicate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from datetime import datetime, timezone

import numpy as np
import pandas as pd

from archive.catalog.ids import new_ids
from archive.errors import ArchiveError, ValidationError
from archive.pipeline.steps import Recorded, RunContext, Step, Unit
from archive.process.characterize import CharacterizeConfig
from archive.process.forced import ForcedConfig

IMAGES = ("calexp", "diff", "both")


def positions_digest(ra, dec) -> str:
    """SHA-256 of positions (deg, rounded to 1e-8), independent of their order and ids."""
    pos = np.round(np.column_stack([np.asarray(ra, float), np.asarray(dec, float)]), 8).reshape(-1, 2)
    pos = pos[np.lexsort((pos[:, 1], pos[:, 0]))]
    return hashlib.sha256(np.ascontiguousarray(pos).tobytes()).hexdigest()


def stable_ids(tile_id: int, band: str, ra, dec) -> np.ndarray:
    """Ids of template sources that depend only on (tile, band, position rounded to 1e-8 deg):
    the first 63 bits of their SHA-256."""
    out = np.empty(len(ra), np.int64)
    for k, (r, d) in enumerate(zip(np.asarray(ra, float), np.asarray(dec, float))):
        h = hashlib.sha256(f"{int(tile_id)}:{band}:{r % 360.0:.8f}:{d:.8f}".encode()).digest()
        out[k] = int.from_bytes(h[:8], "big") >> 1
    if len(np.unique(out)) != len(out):
        raise ArchiveError(f"template catalog of tile {tile_id} {band}: two sources at one position")
    return out


def tile_order(tile_id: int, ra: float, dec: float) -> int:
    """The HEALPix order of a sky tile: the one whose pixel ``tile_id`` is centred at (ra, dec)."""
    import healpy as hp

    for order in range(0, 30):
        nside = 1 << order
        if tile_id >= 12 * nside * nside:
            continue
        r, d = hp.pix2ang(nside, int(tile_id), nest=True, lonlat=True)
        if abs(float(d) - dec) < 1e-7 and abs(((float(r) - ra + 180.0) % 360.0) - 180.0) < 1e-7:
            return order
    raise ArchiveError(f"tile {tile_id}: no HEALPix order centres that pixel at ({ra}, {dec})")


def in_core(tile_id: int, order: int, ra, dec) -> np.ndarray:
    """Whether positions lie in the tile's core (its HEALPix pixel at ``order``)."""
    import healpy as hp

    ra = np.asarray(ra, float)
    if not ra.size:
        return np.zeros(0, bool)
    return hp.ang2pix(1 << order, ra, np.asarray(dec, float), nest=True, lonlat=True) == int(tile_id)


def _templates(ctx: RunContext) -> pd.DataFrame:
    return ctx.store.sql("SELECT tile_id, band, path, sha256, footprint FROM image_product "
                         "WHERE kind = 'template' ORDER BY tile_id, band")


def _polygon(footprint: str):
    from archive.sky.regions import Polygon

    c = np.asarray(json.loads(footprint), float)
    return Polygon(c[:, 0], c[:, 1])


def _diffs(ctx: RunContext) -> pd.DataFrame:
    return ctx.store.sql("SELECT d.exposure_id, d.path AS diff, d.sha256 AS diff_sha, d.footprint, "
                         "e.visit, e.detector, e.band, e.mjd_mid FROM image_product d "
                         "JOIN exposure e ON e.exposure_id = d.exposure_id "
                         "WHERE d.kind = 'diff' AND e.status = 'processed' ORDER BY e.mjd_mid, d.exposure_id")


def _measured(rows: pd.DataFrame) -> pd.DataFrame:
    from archive.process.flags import FLAG_OFF_IMAGE

    keep = ((rows["flags"].to_numpy(np.int64) & FLAG_OFF_IMAGE) == 0) & np.isfinite(rows["psf_flux"].to_numpy(float))
    return rows[keep]


def _replace(ctx: RunContext, tx, table: str, column: str, value, rows: pd.DataFrame, idcol: str,
             match: dict | None = None, where: str = "", keep_ids: bool = False) -> int:
    """Delete ``table``'s rows with ``column == value`` (and ``match``), append ``rows``."""
    from archive.catalog.validate import conform

    old = tx.select_in(table, column, [value])
    for k, v in (match or {}).items():
        old = old[old[k] == v]
    if len(old):
        tx.delete(table, idcol, old[idcol].to_numpy(np.int64))
    if len(rows):
        rows = rows.copy()
        if not keep_ids:
            rows[idcol] = new_ids(len(rows))
        rows["ra"] = rows["ra"].to_numpy(float) % 360.0
        tx.append(table, conform(ctx.store.table(table), rows, where))
    return len(rows)


# -- the templates' own catalogs ---------------------------------------------------------------
@dataclasses.dataclass
class TemplateCatalogConfig:
    """characterize: detection and measurement on the template (as on calexps; no cosmic rays)."""

    characterize: CharacterizeConfig = dataclasses.field(
        default_factory=lambda: CharacterizeConfig(find_cosmic_rays=False))


TEMPLATE_SOURCE_COLUMNS = ["ra", "dec", "x", "y", "psf_flux", "psf_flux_err", "flags"]


class TemplateCatalogStep(Step):
    """Static sources detected and measured on each template, once (``template_source``)."""

    name = "template_catalog"
    requires = ("template",)
    Config = TemplateCatalogConfig

    def units(self, ctx: RunContext) -> list[Unit]:
        return [Unit(self.name, f"tile:{int(r.tile_id)}:{r.band}", inputs={"template": r.sha256},
                     payload={"tile": int(r.tile_id), "band": r.band, "template": r.path},
                     bands=(r.band,), order=(int(r.tile_id), r.band))
                for r in _templates(ctx).itertuples()]

    def run(self, unit: Unit, shared, products) -> pd.DataFrame:
        from archive.process import characterize

        p = unit.payload
        tpl = products.read(p["template"])
        if tpl.wcs is None:
            raise ArchiveError(f"template {p['template']} has no WCS")
        res = characterize.run(tpl, self.config.characterize)
        src = res.sources
        src = src[np.isfinite(src["ra"].to_numpy(float)) & np.isfinite(src["dec"].to_numpy(float))]
        out = src[TEMPLATE_SOURCE_COLUMNS].reset_index(drop=True).copy()
        crval = tpl.wcs.wcs.crval
        order = tile_order(p["tile"], float(crval[0]), float(crval[1]))
        out["is_primary"] = in_core(p["tile"], order, out["ra"], out["dec"])
        return out

    def record(self, ctx: RunContext, unit: Unit, result: pd.DataFrame, tx) -> Recorded:
        p = unit.payload
        rows = result.assign(tile_id=p["tile"], band=p["band"])
        # ids from (tile, band, position): a template measured again gives its sources the same ids,
        # so the forced rows on differences that refer to them stay valid
        rows["template_source_id"] = stable_ids(p["tile"], p["band"], rows["ra"], rows["dec"])
        n = _replace(ctx, tx, "template_source", "tile_id", p["tile"], rows, "template_source_id",
                     {"band": p["band"]}, where=f"template catalog of tile {p['tile']} {p['band']}", keep_ids=True)
        return Recorded(note=f"{n} sources, {int(result['is_primary'].sum())} primary")


# -- the template catalog on every difference ----------------------------------------------------
@dataclasses.dataclass
class TemplateForcedConfig:
    forced: ForcedConfig = dataclasses.field(default_factory=ForcedConfig)


class TemplateForcedStep(Step):
    """PSF fluxes at every primary template source on every difference covering it."""

    name = "template_forced"
    requires = ("template_catalog", "difference")
    Config = TemplateForcedConfig

    def units(self, ctx: RunContext) -> list[Unit]:
        out = []
        for r in _diffs(ctx).itertuples():
            src = ctx.store.query_region("template_source", _polygon(r.footprint),
                                         ["template_source_id", "band", "ra", "dec", "is_primary"])
            src = src[src["is_primary"].astype(bool) & (src["band"] == r.band)].sort_values(["ra", "dec"])
            out.append(Unit(self.name, f"exposure:{int(r.exposure_id)}",
                            inputs={"diff": r.diff_sha, "sources": positions_digest(src["ra"], src["dec"])},
                            payload={"exposure_id": int(r.exposure_id), "visit": int(r.visit),
                                     "detector": int(r.detector), "band": r.band, "mjd": float(r.mjd_mid),
                                     "diff": r.diff,
                                     "sources": src[["template_source_id", "ra", "dec"]].to_dict("list")},
                            visits=(int(r.visit),), bands=(r.band,), order=(float(r.mjd_mid),)))
        return out

    def run(self, unit: Unit, shared, products) -> pd.DataFrame:
        from archive.process.forced import forced_at_sky

        src = pd.DataFrame(unit.payload["sources"], columns=["template_source_id", "ra", "dec"])
        if src.empty:
            return pd.DataFrame()
        diff = products.read(unit.payload["diff"])
        d = forced_at_sky(diff, src["ra"].to_numpy(float), src["dec"].to_numpy(float), self.config.forced)
        return pd.DataFrame({"template_source_id": src["template_source_id"].astype("int64"),
                             "ra": src["ra"], "dec": src["dec"], "x": d["x"], "y": d["y"],
                             "psf_flux": d["psf_flux"], "psf_flux_err": d["psf_flux_err"],
                             "flags": d["flags"].to_numpy(np.int64)})

    def record(self, ctx: RunContext, unit: Unit, result: pd.DataFrame, tx) -> Recorded:
        p = unit.payload
        rows = _measured(result) if len(result) else result
        if len(rows):
            rows = rows.assign(exposure_id=p["exposure_id"], visit=p["visit"], detector=p["detector"],
                               band=p["band"], mjd=p["mjd"])
        n = _replace(ctx, tx, "template_forced_source", "exposure_id", p["exposure_id"], rows,
                     "template_forced_source_id", where=f"template forced photometry of {p['exposure_id']}")
        return Recorded(note=f"{n} template sources measured")


# -- the templates at DIAObject and DIASource positions -----------------------------------------
@dataclasses.dataclass
class DiaTemplateConfig:
    """forced: fits at DIAObject positions; DIASource positions are fitted each on its own
    (a DIASource lies on its object and on its siblings: fitted together they would share
    one star's light); dia_sources: measure DIASource positions too."""

    forced: ForcedConfig = dataclasses.field(default_factory=ForcedConfig)
    dia_sources: bool = True


class DiaTemplateStep(Step):
    """Forced PSF fluxes on each template at its DIAObjects' (and DIASources') positions."""

    name = "dia_template"
    requires = ("template", "difference")
    Config = DiaTemplateConfig

    def units(self, ctx: RunContext) -> list[Unit]:
        out = []
        for r in _templates(ctx).itertuples():
            region = _polygon(r.footprint)
            objs = ctx.store.query_region("dia_object", region, ["dia_object_id", "ra", "dec"], current_only=True)
            objs = objs.sort_values(["ra", "dec"])
            srcs = pd.DataFrame(columns=["dia_source_id", "dia_object_id", "ra", "dec"])
            if self.config.dia_sources:
                srcs = ctx.store.query_region("dia_source", region, ["dia_source_id", "dia_object_id", "ra", "dec"])
                srcs = srcs[srcs["dia_object_id"].notna()].sort_values(["ra", "dec"])
            if objs.empty:
                continue
            out.append(Unit(self.name, f"tile:{int(r.tile_id)}:{r.band}",
                            inputs={"template": r.sha256, "objects": positions_digest(objs["ra"], objs["dec"]),
                                    "sources": positions_digest(srcs["ra"], srcs["dec"])},
                            payload={"tile": int(r.tile_id), "band": r.band, "template": r.path,
                                     "objects": objs[["dia_object_id", "ra", "dec"]].to_dict("list"),
                                     "sources": srcs[["dia_source_id", "dia_object_id", "ra", "dec"]].to_dict("list")},
                            bands=(r.band,), order=(int(r.tile_id), r.band)))
        return out

    def run(self, unit: Unit, shared, products) -> pd.DataFrame:
        from archive.process.forced import forced_at_sky

        p = unit.payload
        tpl = products.read(p["template"])
        order = tile_order(p["tile"], float(tpl.wcs.wcs.crval[0]), float(tpl.wcs.wcs.crval[1]))
        objs = pd.DataFrame(p["objects"], columns=["dia_object_id", "ra", "dec"])
        srcs = pd.DataFrame(p["sources"], columns=["dia_source_id", "dia_object_id", "ra", "dec"])
        parts = []
        o = forced_at_sky(tpl, objs["ra"].to_numpy(float), objs["dec"].to_numpy(float), self.config.forced)
        parts.append(pd.DataFrame({"dia_object_id": objs["dia_object_id"].astype("int64"),
                                   "dia_source_id": pd.array([None] * len(objs), dtype="Int64"),
                                   "ra": objs["ra"], "dec": objs["dec"], "x": o["x"], "y": o["y"],
                                   "psf_flux": o["psf_flux"], "psf_flux_err": o["psf_flux_err"],
                                   "flags": o["flags"].to_numpy(np.int64)}))
        if len(srcs):
            alone = dataclasses.replace(self.config.forced, blend_radius_fwhm=0.0, subtract_bright=False,
                                        recenter=False)
            s = forced_at_sky(tpl, srcs["ra"].to_numpy(float), srcs["dec"].to_numpy(float), alone)
            parts.append(pd.DataFrame({"dia_object_id": srcs["dia_object_id"].astype("int64"),
                                       "dia_source_id": srcs["dia_source_id"].astype("Int64"),
                                       "ra": srcs["ra"], "dec": srcs["dec"], "x": s["x"], "y": s["y"],
                                       "psf_flux": s["psf_flux"], "psf_flux_err": s["psf_flux_err"],
                                       "flags": s["flags"].to_numpy(np.int64)}))
        out = pd.concat(parts, ignore_index=True)
        out["is_primary"] = in_core(p["tile"], order, out["ra"], out["dec"])
        return out

    def record(self, ctx: RunContext, unit: Unit, result: pd.DataFrame, tx) -> Recorded:
        p = unit.payload
        rows = _measured(result).assign(tile_id=p["tile"], band=p["band"], image="template")
        n = _replace(ctx, tx, "dia_template_source", "tile_id", p["tile"], rows, "dia_template_source_id",
                     {"band": p["band"]}, where=f"template forced photometry of tile {p['tile']} {p['band']}")
        return Recorded(note=f"{n} positions measured on the template")


# -- a user's list on every epoch ------------------------------------------------------------------
ID_COLUMNS = ("id", "list_object_id", "object_id", "source_id", "objid")


def read_list(path, id_column: str | None = None) -> pd.DataFrame:
    """A user's list (Parquet, CSV or FITS) as ``list_object_id, ra, dec``, checked.

    ``id_column``: the id column (default: the first of id, list_object_id, object_id,
    source_id, objid found, any case).  Missing columns, non-integer or null ids, duplicate
    ids, non-finite positions and dec outside [-90, 90] are refused with one
    :class:`~archive.errors.ValidationError` naming the rows (and their ids); RA is
    taken modulo 360."""
    from archive.catalog.tablefile import read_table_file

    path = pathlib.Path(path)
    df = read_table_file(path).to_pandas()
    lower = {c.lower(): c for c in df.columns}
    want = [id_column] if id_column else list(ID_COLUMNS)
    idc = next((lower[w.lower()] for w in want if w.lower() in lower), None)
    missing = [c for c in ("ra", "dec") if c not in lower]
    if idc is None:
        missing.append(repr(id_column) if id_column else "an id (" + "/".join(ID_COLUMNS) + ")")
    if missing:
        raise ValidationError(f"{path}: no {' or '.join(missing)} column (columns: {', '.join(map(str, df.columns))})")
    if df.empty:
        raise ValidationError(f"{path}: the list has no rows")
    problems = []

    def rows_of(mask, ids=True) -> str:
        idx = np.flatnonzero(mask)
        text = ", ".join(f"{i}" + (f" (id {df[idc].iloc[i]})" if ids else "") for i in idx[:5])
        return f"row{'s' if len(idx) > 1 else ''} {text}" + (f" and {len(idx) - 5} more" if len(idx) > 5 else "")

    ids = pd.to_numeric(df[idc], errors="coerce")
    as_float = ids.to_numpy(np.float64, na_value=np.nan)
    bad_id = ~np.isfinite(as_float) | (np.round(as_float) != as_float)
    if bad_id.any():
        problems.append(f"{rows_of(bad_id, ids=False)}: {idc} not an integer")
    ra = pd.to_numeric(df[lower["ra"]], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    dec = pd.to_numeric(df[lower["dec"]], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    bad_pos = ~np.isfinite(ra) | ~np.isfinite(dec)
    if bad_pos.any():
        problems.append(f"{rows_of(bad_pos)}: ra/dec not finite")
    with np.errstate(invalid="ignore"):
        bad_dec = np.isfinite(dec) & (np.abs(dec) > 90.0)
    if bad_dec.any():
        problems.append(f"{rows_of(bad_dec)}: dec outside [-90, 90]")
    if not bad_id.any():
        ints = df[idc].astype("int64") if df[idc].dtype.kind in "iu" else pd.Series(as_float).astype("int64")
        dup = ints.duplicated(keep=False).to_numpy()
        if dup.any():
            problems.append(f"{rows_of(dup)}: duplicate {idc}")
    if problems:
        raise ValidationError(f"{path}: {'; '.join(problems)}; nothing registered")
    ids = df[idc].astype("int64") if df[idc].dtype.kind in "iu" else pd.Series(as_float).astype("int64")
    return pd.DataFrame({"list_object_id": ids.to_numpy(np.int64), "ra": ra % 360.0, "dec": dec})


def register_list(store, path, products_root: os.PathLike, images: str = "calexp", recenter: bool = False,
                  name: str | None = None, id_column: str | None = None) -> tuple[int, bool]:
    """Read and check a user's list (:func:`read_list`), copy it under ``PRODUCTS/lists/`` and
    register it in ``forced_list``.  Returns (list_id, new): the same positions with the same
    options are the same list (registered once, so measuring it again adds nothing)."""
    from archive.catalog.validate import conform
    from archive.pipeline.products import sha256_file

    if images not in IMAGES:
        raise ValidationError(f"--on {images!r}: use one of {', '.join(IMAGES)}")
    path = pathlib.Path(path)
    table = read_list(path, id_column).sort_values("list_object_id", kind="stable").reset_index(drop=True)
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(table["list_object_id"].to_numpy(np.int64)).tobytes())
    h.update(np.ascontiguousarray(np.round(table[["ra", "dec"]].to_numpy(float), 10)).tobytes())
    h.update(f"{images}:{bool(recenter)}".encode())
    list_id = int.from_bytes(h.digest()[:8], "big") >> 1
    known = store.sql(f"SELECT list_id FROM forced_list WHERE list_id = {list_id}")
    if len(known):
        return list_id, False
    folder = pathlib.Path(products_root) / "lists"
    folder.mkdir(parents=True, exist_ok=True)
    rel = f"lists/list-{list_id}.parquet"
    tmp = folder / f".list-{list_id}.{os.getpid()}.tmp"
    table.to_parquet(tmp, index=False)
    os.replace(tmp, pathlib.Path(products_root) / rel)
    row = {"list_id": list_id, "name": name or path.stem, "source_path": str(path.resolve()), "path": rel,
           "sha256": sha256_file(pathlib.Path(products_root) / rel), "n_rows": len(table), "images": images,
           "recenter": bool(recenter), "registered": datetime.now(timezone.utc)}
    store.write("forced_list", conform(store.table("forced_list"), pd.DataFrame([row]), str(path)))
    return list_id, True


@dataclasses.dataclass
class ForcedListConfig:
    """forced: the fit (``recenter`` is each list's own choice); margin_px: positions this far
    off the image still enter as neighbours."""

    forced: ForcedConfig = dataclasses.field(default_factory=ForcedConfig)
    margin_px: float = dataclasses.field(default=20.0, metadata={"min": 0.0})


class ForcedListStep(Step):
    """Every registered list measured on every calexp (and difference when the list asks)."""

    name = "forced_list"
    requires = ("difference",)
    Config = ForcedListConfig

    def units(self, ctx: RunContext) -> list[Unit]:
        lists = ctx.store.sql("SELECT list_id, path, sha256, images, recenter FROM forced_list ORDER BY list_id")
        if lists.empty:
            return []
        exp = ctx.store.sql("SELECT e.exposure_id, e.visit, e.detector, e.band, e.mjd_mid, c.path AS calexp, "
                            "c.sha256 AS calexp_sha, d.path AS diff, d.sha256 AS diff_sha FROM exposure e "
                            "JOIN image_product c ON c.exposure_id = e.exposure_id AND c.kind = 'calexp' "
                            "LEFT JOIN image_product d ON d.exposure_id = e.exposure_id AND d.kind = 'diff' "
                            "WHERE e.status = 'processed' ORDER BY e.mjd_mid, e.exposure_id")
        out = []
        for lst in lists.itertuples():
            want_calexp, want_diff = lst.images in ("calexp", "both"), lst.images in ("diff", "both")
            for r in exp.itertuples():
                diff = r.diff if isinstance(r.diff, str) else None
                if want_diff and not want_calexp and diff is None:
                    continue  # nothing to measure until the difference exists
                inputs = {"list": lst.sha256, "recenter": bool(lst.recenter), "images": lst.images}
                if want_calexp:
                    inputs["calexp"] = r.calexp_sha
                if want_diff:
                    inputs["diff"] = r.diff_sha if diff else None
                out.append(Unit(self.name, f"list:{int(lst.list_id)}:exposure:{int(r.exposure_id)}", inputs=inputs,
                                payload={"list_id": int(lst.list_id), "list": lst.path, "recenter": bool(lst.recenter),
                                         "exposure_id": int(r.exposure_id), "visit": int(r.visit),
                                         "detector": int(r.detector), "band": r.band, "mjd": float(r.mjd_mid),
                                         "calexp": r.calexp if want_calexp else None,
                                         "diff": diff if want_diff else None},
                                visits=(int(r.visit),), bands=(r.band,), order=(float(r.mjd_mid),)))
        return out

    def run(self, unit: Unit, shared, products) -> pd.DataFrame:
        return measure_list(unit.payload, products, self.config)

    def record(self, ctx: RunContext, unit: Unit, result: pd.DataFrame, tx) -> Recorded:
        p = unit.payload
        rows = _measured(result) if len(result) else result
        if len(rows):
            rows = rows.assign(list_id=p["list_id"], exposure_id=p["exposure_id"], visit=p["visit"],
                               detector=p["detector"], band=p["band"], mjd=p["mjd"], forced=True)
        n = _replace(ctx, tx, "list_forced_source", "exposure_id", p["exposure_id"], rows, "list_forced_source_id",
                     {"list_id": p["list_id"]}, where=f"list {p['list_id']} on exposure {p['exposure_id']}")
        return Recorded(note=f"{n} forced rows")


def measure_list(p: dict, products, cfg: ForcedListConfig) -> pd.DataFrame:
    """Worker side of a forced_list unit: the list's positions near the exposure, measured on
    its calexp (recentred when the list says so) and/or its difference (at the calexp's final
    positions).  Columns: list_object_id, image, ra, dec, x, y, psf_flux, psf_flux_err, flags, moved."""
    from archive.process.forced import forced_at_sky, sky_to_pixel
    from archive.process.warp import in_njy

    table = pd.read_parquet(products.path(p["list"]))
    first = products.read(p["calexp"] or p["diff"])
    x, y = sky_to_pixel(first, table["ra"].to_numpy(float), table["dec"].to_numpy(float))
    ny, nx = first.shape
    m = cfg.margin_px
    with np.errstate(invalid="ignore"):
        near = (x > -m) & (x < nx - 1 + m) & (y > -m) & (y < ny - 1 + m)
    table = table[near].reset_index(drop=True)
    if table.empty:
        return pd.DataFrame()
    fc = dataclasses.replace(cfg.forced, recenter=bool(p["recenter"]))
    ra, dec = table["ra"].to_numpy(float), table["dec"].to_numpy(float)
    parts = []
    if p["calexp"]:
        if first.photo_calib is None:
            raise ArchiveError(f"calexp of exposure {p['exposure_id']} has no photometric calibration: no nJy")
        science = in_njy(first)
        del first
        c = forced_at_sky(science, ra, dec, fc)
        parts.append(_list_rows(table, c, "calexp"))
        ra, dec = c["ra"].to_numpy(float), c["dec"].to_numpy(float)  # the diff at the final positions
        fc = dataclasses.replace(fc, recenter=False)
    if p["diff"]:
        diff = products.read(p["diff"]) if p["calexp"] else first
        d = forced_at_sky(diff, ra, dec, fc)
        if p["calexp"]:
            d["moved"] = parts[0]["moved"].to_numpy()
        parts.append(_list_rows(table, d, "diff"))
    return pd.concat(parts, ignore_index=True)


def _list_rows(table: pd.DataFrame, res: pd.DataFrame, image: str) -> pd.DataFrame:
    return pd.DataFrame({"list_object_id": table["list_object_id"].to_numpy(np.int64), "image": image,
                         "ra": res["ra"].to_numpy(float), "dec": res["dec"].to_numpy(float),
                         "x": res["x"].to_numpy(float), "y": res["y"].to_numpy(float),
                         "psf_flux": res["psf_flux"].to_numpy(float), "psf_flux_err": res["psf_flux_err"].to_numpy(float),
                         "flags": res["flags"].to_numpy(np.int64), "moved": res["moved"].to_numpy(bool)})
