"""Our column names beside Rubin's and ZTF's: one table, for docs and exports.

:data:`MAPPING` is the only place the correspondence is written.
``docs/column_mapping.md`` is generated from it (:func:`markdown`), and
``archive sql|cone|get|object|lightcurve --names rubin|ztf`` (``Archive.rename``)
exports with it.

* **Rubin** names are those of the Rubin Science Data Model (APDB
  ``DiaSource``/``DiaObject``/``DiaForcedSource``, the DP1 ``Source`` and
  visit tables, the ``lsst.v7`` alert packets).  Units agree (nJy, degrees,
  MJD TAI), so a Rubin export renames and changes no value.
* **ZTF** names are those of the ZTF alert packet's ``candidate`` record, for
  the ``dia_source`` columns that have a counterpart.  ZTF reports magnitudes,
  UTC Julian dates at the start of the exposure, 1-based pixels and filter
  ids, so a ZTF export converts: ``magpsf``/``sigmapsf`` from the difference
  flux (AB, of ``|psf_flux|``; ``isdiffpos`` 't' or 'f' carries the sign), ``jd``
  = UTC JD of ``mjd`` (TAI, mid-exposure) minus half of ZTF's 30 s exposure,
  ``fid`` 1/2/3 for g/r/i, ``xpos``/``ypos`` = x/y + 1.  These are the inverse
  of what ``archive ingest alerts`` applies, so a ZTF detection read from an
  alert goes back to its own values.

A column without a counterpart keeps its name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: AB magnitude of 1 nJy.
AB_NJY_ZP = 31.4
#: ZTF's survey exposure (s): ``jd`` is the start of the exposure, ``mjd`` its middle.
ZTF_EXPTIME_S = 30.0
#: ZTF filter ids.
ZTF_FID = {"g": 1, "r": 2, "i": 3}

CONVENTIONS = ("archive", "rubin", "ztf")


@dataclass(frozen=True)
class Name:
    """One of our columns (``{band}`` stands for every band) and its names elsewhere.

    ``ztf_how``: how a ZTF export derives its value (see the module doc); ``""``
    for a plain rename."""

    table: str
    column: str
    rubin: str | None = None
    ztf: str | None = None
    ztf_how: str = ""


def _rows(table: str, *items) -> list[Name]:
    return [Name(table, *item) for item in items]


_POSITION = (("ra", "ra"), ("dec", "dec"), ("ra_err", "raErr"), ("dec_err", "decErr"),
             ("ra_dec_cov", "ra_dec_Cov"))

#: The correspondence, table by table.
MAPPING: tuple[Name, ...] = tuple(
    _rows("exposure",
          ("exposure_id", "ccdVisitId"), ("visit", "visit"), ("detector", "detector"), ("band", "band"),
          ("mjd_mid", "expMidptMJD"), ("exp_time", "expTime"), ("airmass", "airmass"), ("ra", "ra"),
          ("dec", "dec"), ("rot_angle", "skyRotation"), ("seeing", "seeing"), ("sky_level", "skyBg"),
          ("zero_point", "zeroPoint"))
    + _rows("source",
            ("source_id", "sourceId"), ("visit", "visit"), ("detector", "detector"), ("band", "band"),
            ("mjd", "midpointMjdTai"), *_POSITION, ("x", "x"), ("y", "y"), ("x_err", "xErr"),
            ("y_err", "yErr"), ("psf_flux", "psfFlux"), ("psf_flux_err", "psfFluxErr"),
            ("ap_flux_r3", "ap03Flux"), ("ap_flux_r3_err", "ap03FluxErr"), ("ap_flux_r6", "ap06Flux"),
            ("ap_flux_r6_err", "ap06FluxErr"), ("ap_flux_r12", "ap12Flux"), ("ap_flux_r12_err", "ap12FluxErr"),
            ("ixx", "ixx"), ("iyy", "iyy"), ("ixy", "ixy"), ("extendedness", "extendedness"), ("sky", "sky"))
    + _rows("dia_source",
            ("dia_source_id", "diaSourceId"), ("dia_object_id", "diaObjectId"),
            ("exposure_id", None, "pid"), ("visit", "visit"), ("detector", "detector", "rcid"),
            ("band", "band", "fid", "fid"), ("mjd", "midpointMjdTai", "jd", "jd"),
            ("ra", "ra", "ra"), ("dec", "dec", "dec"), *_POSITION[2:],
            ("x", "x", "xpos", "pixel1"), ("y", "y", "ypos", "pixel1"), ("x_err", "xErr"), ("y_err", "yErr"),
            ("psf_flux", "psfFlux", "magpsf", "mag"), ("psf_flux_err", "psfFluxErr", "sigmapsf", "magerr"),
            ("ap_flux", "apFlux", "magap", "mag"), ("ap_flux_err", "apFluxErr", "sigmagap", "magerr"),
            ("science_flux", "scienceFlux"), ("science_flux_err", "scienceFluxErr"), ("snr", "snr"),
            ("ixx", "ixx"), ("iyy", "iyy"), ("ixy", "ixy"), ("is_dipole", "isDipole"),
            ("external_id", None, "candid"), ("external_object_id", None, "objectId"))
    + _rows("dia_object",
            ("dia_object_id", "diaObjectId"), ("validity_start", "validityStartMjdTai"),
            ("validity_end", "validityEndMjdTai"), *_POSITION, ("radec_mjd", "radecMjdTai"),
            ("n_dia_sources", "nDiaSources"), ("first_mjd", "firstDiaSourceMjdTai"),
            ("last_mjd", "lastDiaSourceMjdTai"), ("{band}_psf_flux_mean", "{band}_psfFluxMean"),
            ("{band}_psf_flux_mean_err", "{band}_psfFluxMeanErr"), ("{band}_psf_flux_sigma", "{band}_psfFluxSigma"),
            ("{band}_psf_flux_chi2", "{band}_psfFluxChi2"), ("{band}_psf_flux_ndata", "{band}_psfFluxNdata"),
            ("{band}_psf_flux_min", "{band}_psfFluxMin"), ("{band}_psf_flux_max", "{band}_psfFluxMax"))
    + _rows("dia_forced_source",
            ("dia_forced_source_id", "diaForcedSourceId"), ("dia_object_id", "diaObjectId"),
            ("visit", "visit"), ("detector", "detector"), ("band", "band"), ("mjd", "midpointMjdTai"),
            ("ra", "ra"), ("dec", "dec"), ("x", "x"), ("y", "y"), ("psf_flux", "psfFlux"),
            ("psf_flux_err", "psfFluxErr"), ("science_flux", "scienceFlux"),
            ("science_flux_err", "scienceFluxErr"))
)

#: What a ZTF conversion does, for the docs.
ZTF_HOW = {
    "": "same value",
    "mag": "AB magnitude of |flux| (31.4 - 2.5 log10 |flux/nJy|); `isdiffpos` = 't' (flux >= 0) or 'f'",
    "magerr": "2.5 / ln 10 x error / |flux| (mag)",
    "jd": "UTC Julian date of `mjd` (TAI, mid-exposure) minus 15 s: ZTF's `jd` is the start of its 30 s exposure",
    "fid": "1, 2, 3 for g, r, i (null for other bands)",
    "pixel1": "1-based pixel (ours + 1)",
}


def expanded(bands) -> list[Name]:
    """:data:`MAPPING` with ``{band}`` templates expanded for ``bands``."""
    out = []
    for n in MAPPING:
        if "{band}" in n.column:
            out += [Name(n.table, n.column.format(band=b), n.rubin and n.rubin.format(band=b),
                         n.ztf and n.ztf.format(band=b), n.ztf_how) for b in bands]
        else:
            out.append(n)
    return out


def names_for(columns, convention: str, table: str | None, bands) -> dict[str, Name]:
    """Our column -> its :class:`Name` row for ``convention``, for the columns that have one.

    With ``table``: that table's rows.  Without (an SQL result): a column takes the
    name every table that maps it agrees on, so ``psf_flux`` is ``psfFlux`` but a
    name that differs between tables is left as it is."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown naming convention {convention!r}; use one of {', '.join(CONVENTIONS)}")
    if convention == "archive":
        return {}
    rows = [n for n in expanded(bands) if getattr(n, convention)]
    out: dict[str, Name] = {}
    for c in columns:
        mine = [n for n in rows if n.column == c and (table is None or n.table == table)]
        key = (lambda n: (n.ztf, n.ztf_how)) if convention == "ztf" else (lambda n: n.rubin)
        if mine and all(key(n) == key(mine[0]) for n in mine):
            out[c] = mine[0]
    return out


#: Unit, UCD and description of a ZTF value that is not ours renamed.
ZTF_META = {
    "mag": {"unit": "mag", "ucd": "phot.mag", "description": "AB magnitude of |flux| on the difference image."},
    "magerr": {"unit": "mag", "ucd": "stat.error;phot.mag", "description": "Uncertainty of the magnitude."},
    "jd": {"unit": "d", "ucd": "time.start", "description": "UTC Julian date at the start of the exposure."},
    "fid": {"unit": None, "ucd": "instr.filter", "description": "ZTF filter id: 1 g, 2 r, 3 i."},
    "pixel1": {"unit": "pix", "ucd": None, "description": "1-based pixel coordinate."},
    "isdiffpos": {"unit": None, "ucd": "meta.code",
                  "description": "t: positive difference flux, f: negative."},
}


def rename(df, convention: str, table: str | None = None, bands=(), meta: dict | None = None):
    """``df`` with Rubin or ZTF column names (and ZTF's units; see the module doc), and
    ``meta`` (column -> unit, ucd, description) for the new columns: ``(frame, meta)``."""
    import numpy as np
    import pandas as pd

    meta = dict(meta or {})
    found = names_for(df.columns, convention, table, bands)
    out, out_meta = {}, {}
    for c in df.columns:
        n = found.get(c)
        if n is None:
            out[c] = df[c]
            if c in meta:
                out_meta[c] = meta[c]
            continue
        new = getattr(n, convention)
        if convention != "ztf" or n.ztf_how == "":
            out[new] = df[c]
            if c in meta:
                out_meta[new] = meta[c]
            continue
        out_meta[new] = dict(ZTF_META[n.ztf_how])
        if n.ztf_how == "mag":
            f = pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64, na_value=np.nan)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[new] = np.where(f != 0, AB_NJY_ZP - 2.5 * np.log10(np.abs(f)), np.nan)
            if c == "psf_flux":
                out["isdiffpos"] = pd.array([None if np.isnan(v) else ("t" if v >= 0 else "f") for v in f],
                                            dtype="string")
                out_meta["isdiffpos"] = dict(ZTF_META["isdiffpos"])
        elif n.ztf_how == "magerr":
            flux_col = c[: -len("_err")]
            f = (pd.to_numeric(df[flux_col], errors="coerce").to_numpy(np.float64, na_value=np.nan)
                 if flux_col in df.columns else np.full(len(df), np.nan))
            e = pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64, na_value=np.nan)
            with np.errstate(divide="ignore", invalid="ignore"):
                out[new] = 2.5 / math.log(10.0) * e / np.abs(f)
        elif n.ztf_how == "jd":
            out[new] = mjd_tai_to_ztf_jd(pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64, na_value=np.nan))
        elif n.ztf_how == "fid":
            out[new] = pd.array([ZTF_FID.get(b) if isinstance(b, str) else None for b in df[c]], dtype="Int64")
        elif n.ztf_how == "pixel1":
            out[new] = pd.to_numeric(df[c], errors="coerce") + 1.0
        else:  # pragma: no cover - MAPPING and this function are written together
            raise AssertionError(n.ztf_how)
    return pd.DataFrame(out, index=df.index), out_meta


def mjd_tai_to_ztf_jd(mjd):
    """MJD (TAI, mid-exposure) -> ZTF ``jd`` (UTC Julian date at the start of a 30 s exposure)."""
    import numpy as np
    from astropy.time import Time

    mjd = np.asarray(mjd, dtype=np.float64)
    out = np.full(mjd.shape, np.nan)
    ok = np.isfinite(mjd)
    if ok.any():
        out[ok] = Time(mjd[ok], format="mjd", scale="tai").utc.jd - ZTF_EXPTIME_S / 2.0 / 86400.0
    return out


def markdown() -> str:
    """docs/column_mapping.md."""
    out = ["# Column names: archive, Rubin, ZTF", "",
           "Generated from `archive/catalog/colnames.py` (`MAPPING`) by `archive names`; "
           "`--names rubin|ztf` on `archive sql`, `cone`, `get`, `object` and `lightcurve` "
           "exports with these names.  `{band}` stands for each band (u g r i z y w).",
           "A Rubin export renames only (the units agree: nJy, degrees, MJD TAI).  A ZTF export "
           "converts as the last column says, the inverse of `archive ingest alerts`.  "
           "Columns not listed keep their names.", ""]
    tables = list(dict.fromkeys(n.table for n in MAPPING))
    for t in tables:
        rows = [n for n in MAPPING if n.table == t]
        has_ztf = any(n.ztf for n in rows)
        out += [f"## `{t}`", ""]
        if has_ztf:
            out += ["| archive | Rubin | ZTF alert | ZTF value |", "|---|---|---|---|"]
            out += [f"| `{n.column}` | {_code(n.rubin)} | {_code(n.ztf)} | {ZTF_HOW[n.ztf_how] if n.ztf else ''} |"
                    for n in rows]
        else:
            out += ["| archive | Rubin |", "|---|---|"]
            out += [f"| `{n.column}` | {_code(n.rubin)} |" for n in rows]
        out.append("")
    return "\n".join(out)


def _code(name: str | None) -> str:
    return f"`{name}`" if name else ""
