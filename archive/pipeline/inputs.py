"""Input files: registering raw frames, calibration frames and other pipelines' calibrated
exposures (``archive ingest images``), and the master calibrations built from them.

Registration reads each file's header (and, for a calibrated exposure, checks
its IMAGE/MASK/VARIANCE layout), computes its SHA-256 and writes one
``input_file`` row per file, all in one transaction: a batch with any bad
file registers nothing, and the error names every bad file and what is wrong
with it.  A file whose contents are already registered (same SHA-256) is
reported and skipped.  Two files giving the same exposure id (in the batch,
or one already registered with other contents) are refused.

Master bias/dark/flat frames are built by the driver from the registered
calibration frames of a detector (and band, for flats), written once under
``PRODUCTS/master/`` with the checksums of their inputs in the file name, and
read by the workers from there; a new or changed calibration frame gives a
new master.
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
from archive.errors import ArchiveError
from archive.image.foreign import is_calibrated_mef, read_calibrated_mef
from archive.image.raw import read_raw
from archive.pipeline.products import exposure_id_of, sha256_file

_MAX_ERRORS_SHOWN = 8


@dataclasses.dataclass
class RegisterReport:
    """registered: paths newly registered; duplicates: path -> the registered path with the
    same contents (skipped); science / calibration: how many of each were registered."""

    registered: list[str] = dataclasses.field(default_factory=list)
    duplicates: dict[str, str] = dataclasses.field(default_factory=dict)
    science: int = 0
    calibration: int = 0


def describe_file(path: pathlib.Path) -> dict:
    """The ``input_file`` row of one file (without id, checksum and time); raises
    :class:`~archive.errors.ArchiveError` naming what is wrong with it."""
    if is_calibrated_mef(path):
        exp = read_calibrated_mef(path)
        info, kind, imagetyp = exp.info, "calibrated", "OBJECT"
    else:
        raw = read_raw(path)
        info, kind, imagetyp = raw.info, "raw", raw.imagetyp
    det = int(info.detector)
    row = {"path": str(path.resolve()), "kind": kind, "imagetyp": imagetyp, "detector": det,
           "band": info.band or None, "mjd": float(info.mjd) if np.isfinite(info.mjd) else None,
           "exposure_id": None, "visit": None}
    if imagetyp == "OBJECT":
        if not info.extras.get("visit_from", "VISIT"):
            raise ArchiveError("no VISIT card (nor EXPNUM, EXPID, OBSID) and no time card (MJD-OBS, DATE-OBS, "
                               "MJD-AVG) to derive the visit from; add VISIT = <integer>, unique per exposure")
        if not info.band:
            raise ArchiveError("no FILTER or BAND card: a science frame needs its band")
        row.update(exposure_id=exposure_id_of(info.visit, det), visit=int(info.visit))
    elif imagetyp == "FLAT" and not info.band:
        raise ArchiveError("a FLAT frame needs its FILTER or BAND card")
    elif imagetyp not in ("BIAS", "DARK", "FLAT"):
        raise ArchiveError(f"IMAGETYP is {imagetyp!r}, expected OBJECT, BIAS, DARK or FLAT")
    return row


def register_inputs(store, paths) -> RegisterReport:
    """Register input FITS files (see the module docstring); returns what was done."""
    from archive.catalog.validate import conform

    report = RegisterReport()
    files: list[pathlib.Path] = []
    seen: set[pathlib.Path] = set()
    errors: list[str] = []
    for p in (pathlib.Path(p) for p in paths):
        if not p.is_file():
            errors.append(f"{p}: no such file")
        elif p.resolve() not in seen:
            seen.add(p.resolve())
            files.append(p)
    rows = []
    for p in files:
        try:
            row = describe_file(p)
        except (ArchiveError, OSError, ValueError, KeyError) as exc:
            errors.append(f"{p}: {exc}".strip())
            continue
        row["sha256"], row["size_bytes"] = sha256_file(p), p.stat().st_size
        rows.append(row)
    if errors:
        shown = "; ".join(errors[:_MAX_ERRORS_SHOWN])
        more = f"; and {len(errors) - _MAX_ERRORS_SHOWN} more" if len(errors) > _MAX_ERRORS_SHOWN else ""
        raise ArchiveError(f"{len(errors)} bad input file(s), nothing registered: {shown}{more}")
    if not rows:
        raise ArchiveError("no input files given")
    new = pd.DataFrame(rows)
    stored = store.sql("SELECT path, sha256, exposure_id FROM input_file")
    known = dict(zip(stored["sha256"], stored["path"]))
    keep = []
    first_of: dict[str, str] = {}
    for i, r in new.iterrows():
        twin = known.get(r["sha256"]) or first_of.get(r["sha256"])
        if twin:
            report.duplicates[r["path"]] = twin
        else:
            first_of[r["sha256"]] = r["path"]
            keep.append(i)
    new = new.loc[keep].reset_index(drop=True)
    _check_exposure_ids(new, stored)
    if new.empty:
        return report
    new["file_id"] = new_ids(len(new))
    new["registered"] = datetime.now(timezone.utc)
    store.write("input_file", conform(store.table("input_file"), new, "input files"))
    report.registered = new["path"].tolist()
    report.science = int((new["imagetyp"] == "OBJECT").sum())
    report.calibration = len(new) - report.science
    return report


def _check_exposure_ids(new: pd.DataFrame, stored: pd.DataFrame) -> None:
    sci = new[new["exposure_id"].notna()]
    parts = []
    for eid, grp in sci.groupby("exposure_id"):
        if len(grp) > 1:
            parts.append(f"{', '.join(grp['path'])} all give exposure id {int(eid)}")
    held = stored[stored["exposure_id"].notna()]
    clash = sci.merge(held, on="exposure_id", suffixes=("", "_stored"))
    for _, r in clash.iterrows():
        parts.append(f"{r['path']} gives exposure id {int(r['exposure_id'])}, already registered from "
                     f"{r['path_stored']} (other contents)")
    if parts:
        raise ArchiveError("duplicate exposure ids: " + "; ".join(parts[:5])
                           + "; give each exposure a distinct VISIT (or EXPNUM) card and each detector its "
                             "DETECTOR card; nothing registered")


# -- master calibrations -----------------------------------------------------------
def calibration_frames(store) -> pd.DataFrame:
    """Registered BIAS, DARK and FLAT frames (``input_file`` rows)."""
    return store.sql("SELECT * FROM input_file WHERE imagetyp IN ('BIAS', 'DARK', 'FLAT') ORDER BY path")


def master_inputs(calib: pd.DataFrame, detector: int, band: str) -> dict[str, list[str]]:
    """Checksums of the calibration frames behind the masters of a science frame:
    {"bias": [...], "dark": [...], "flat": [...]} (sorted)."""
    det = calib[calib["detector"] == int(detector)]
    out = {}
    for kind in ("BIAS", "DARK", "FLAT"):
        sel = det[det["imagetyp"] == kind]
        if kind == "FLAT":
            sel = sel[sel["band"] == band]
        out[kind.lower()] = sorted(sel["sha256"])
    return out


def build_masters(calib: pd.DataFrame, needed: set[tuple[int, str]], root: os.PathLike) -> dict:
    """Write the masters for every (detector, band) in ``needed`` under ``root/master``
    (once per set of inputs); returns {(detector, band): {"bias": path|None, ...}}."""
    from archive.process.masters import make_master_bias, make_master_dark, make_master_flat

    out: dict = {}
    cache: dict[tuple, str | None] = {}

    def frames(shas: list[str]):
        paths = calib.set_index("sha256").loc[shas, "path"]
        return [read_raw(p) for p in paths]

    def master(kind: str, det: int, band: str, shas: list[str], make):
        if not shas:
            return None
        key = (kind, det, band, tuple(shas))
        if key not in cache:
            digest = hashlib.sha256(json.dumps(list(key[:3]) + shas).encode()).hexdigest()[:16]
            path = pathlib.Path(root) / "master" / (band or "_") / f"d{det:02d}" / f"{kind}_{digest}.fits"
            if not path.is_file():
                exp = make()
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
                exp.writeto(tmp)
                os.replace(tmp, path)
            cache[key] = str(path)
        return cache[key]

    from archive.image.exposure import Exposure

    def load(path):
        return Exposure.read(path) if path else None

    for det, band in sorted(needed):
        shas = master_inputs(calib, det, band)
        bias = master("bias", det, "", shas["bias"], lambda: make_master_bias(frames(shas["bias"])))
        dark = master("dark", det, "", shas["dark"],
                      lambda: make_master_dark(frames(shas["dark"]), load(bias)))
        flat = master("flat", det, band, shas["flat"],
                      lambda: make_master_flat(frames(shas["flat"]), load(bias), load(dark)))
        out[(det, band)] = {"bias": bias, "dark": dark, "flat": flat}
    return out


def science_inputs(store) -> pd.DataFrame:
    """Registered science frames and calibrated exposures (``input_file`` rows), by exposure id."""
    rows = store.sql("SELECT * FROM input_file WHERE imagetyp = 'OBJECT'")
    return rows.sort_values("exposure_id").reset_index(drop=True)


# -- reference catalog ------------------------------------------------------------------
def register_refcat(store, source, products_root: os.PathLike) -> tuple[str, str]:
    """Copy a reference catalog (a file, or a DataFrame with ``ra``, ``dec`` and band
    magnitudes) into ``PRODUCTS/refcat/`` as Parquet and register it; it is the catalog
    every later run uses, until another is registered.  Returns (path, sha256); the same
    contents registered again change nothing."""
    from archive.catalog.tablefile import read_table_file
    from archive.catalog.validate import conform

    table = source if isinstance(source, pd.DataFrame) else read_table_file(source).to_pandas()
    missing = [c for c in ("ra", "dec") if c not in table.columns]
    if missing:
        raise ArchiveError(f"{source if not isinstance(source, pd.DataFrame) else 'reference catalog'}: "
                           f"no {' or '.join(missing)} column")
    folder = pathlib.Path(products_root) / "refcat"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".refcat.{os.getpid()}.tmp"
    table.to_parquet(tmp, index=False)
    sha = sha256_file(tmp)
    path = folder / f"refcat-{sha[:16]}.parquet"
    os.replace(tmp, path)
    known = store.sql(f"SELECT file_id FROM input_file WHERE kind = 'refcat' AND sha256 = '{sha}'")
    if known.empty:
        row = {"file_id": int(new_ids(1)[0]), "path": str(path.resolve()), "sha256": sha,
               "size_bytes": path.stat().st_size, "kind": "refcat", "imagetyp": "REFCAT",
               "registered": datetime.now(timezone.utc)}
        store.write("input_file", conform(store.table("input_file"), pd.DataFrame([row]), str(path)))
    return str(path), sha


def current_refcat(store) -> tuple[str | None, str | None]:
    """(path, sha256) of the newest registered reference catalog, or (None, None)."""
    rows = store.sql("SELECT path, sha256 FROM input_file WHERE kind = 'refcat' ORDER BY registered DESC, file_id DESC")
    if rows.empty:
        return None, None
    return str(rows["path"].iloc[0]), str(rows["sha256"].iloc[0])
