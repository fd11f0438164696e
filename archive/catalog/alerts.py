"""Read survey alert packets into ``dia_source`` rows (pure: files in, a DataFrame out).

Supported forms, recognised by content (not by file name):

* **ZTF** alerts (schema 3.x/4.x, ``candidate`` + ``prv_candidates``): Avro
  files (one or many alerts per file, as ZTF, Fink and AMPEL write them),
  ``.tar.gz``/``.tar`` archives of such Avro files, and Parquet tables with
  the same fields (Fink).
* **LSST/Rubin** alerts (``diaSource`` + ``prvDiaSources``, schema lsst.v*):
  Avro files and Parquet tables (as Fink redistributes them).

Conversions:

* ZTF ``magpsf``/``sigmapsf`` are calibrated AB magnitudes of the difference
  image (ZTF already applied ``magzpsci``), so
  ``|flux| [nJy] = 10**(-0.4 * (magpsf - 31.4))`` and
  ``flux_err = |flux| * 0.4 * ln(10) * sigmapsf``.  A negative difference
  (``isdiffpos`` 'f' or '0') gives a negative flux.  ``magap``/``sigmagap`` give
  ``ap_flux`` the same way.  ``snr = |flux| / flux_err``.
* ZTF ``jd`` is the UTC Julian date at the *start* of the exposure (ZTF schema
  docs).  ``mjd`` = MJD (TAI) at mid-exposure:
  ``Time(jd + exptime/2/86400, format='jd', scale='utc').tai.mjd``, with
  ``exptime`` from the candidate, or 30 s (ZTF's survey exposure) for
  ``prv_candidates`` which do not carry it.  Rubin ``midpointMjdTai`` is
  already TAI at mid-exposure.
* ZTF ``fid`` 1, 2, 3 -> bands g, r, i.  ZTF positions have no errors
  (``ra_err``/``dec_err`` null); ``xpos``/``ypos`` are 1-based and become
  0-based ``x``/``y``.  ``exposure_id`` = ``visit`` = ZTF ``pid`` (one
  readout-quadrant image), ``detector`` = ``rcid``.
* Rubin: fluxes already nJy, positions and errors in degrees; ``exposure_id``
  = visit * 1000 + detector (the archive's convention, :func:`archive.catalog.ids.exposure_id_of`).
* ``external_id`` = ZTF ``candid`` / Rubin ``diaSourceId`` (as text);
  ``external_object_id`` = ZTF ``objectId`` / Rubin ``diaObjectId`` (null
  for Rubin's 0, a source attributed to a solar-system object).
  Previous detections repeat across alerts and are kept once: ZTF on
  (objectId, pid, candid as float64, ra, dec), since some Fink Parquet files
  store ``prv_candidates.candid`` as a double (a copy with an exact integer
  candid is preferred), Rubin on diaSourceId.  ZTF ``prv_candidates`` without ``candid``
  are upper limits (non-detections) and are skipped.
* ``dia_source_id`` are fresh archive ids (:func:`archive.catalog.ids.new_ids`);
  ``dia_object_id`` is null until association; ``flags`` = 0 (survey quality
  flags are not translated into the archive's bit planes).
"""

from __future__ import annotations

import io
import logging
import math
import os
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from archive.catalog.ids import exposure_id_of, new_ids
from archive.catalog.schema import load_schema
from archive.errors import ValidationError
from archive.sky.healpix import radec_to_healpix29

log = logging.getLogger(__name__)

#: AB magnitude of 1 nJy.
AB_NJY_ZP = 31.4
#: ZTF filter id -> band.
ZTF_BANDS = {1: "g", 2: "r", 3: "i"}
#: Exposure time assumed for ZTF prv_candidates (s).
ZTF_DEFAULT_EXPTIME_S = 30.0
#: Match radius (arcsec) for the rows of a survey, recognised by the prefix of its own
#: object ids (``external_object_id``).  ZTF's alert pipeline groups candidates within
#: 1.5" into one objectId, and ZTF positions carry no errors (no chi^2 gate can widen a
#: 1" radius for them): its detections scatter 0.6-1.0" (up to 1.4") about their mean.
SURVEY_RADIUS_ARCSEC = {"ZTF": 1.5}

_AVRO_MAGIC = b"Obj\x01"
_PARQUET_MAGIC = b"PAR1"
_GZIP_MAGIC = b"\x1f\x8b"
_ZTF_FIELDS = ("candid", "jd", "fid", "pid", "ra", "dec", "magpsf", "sigmapsf", "isdiffpos",
               "magap", "sigmagap", "xpos", "ypos", "rcid", "exptime")


# --------------------------------------------------------------------------- conversions
def mag_to_njy(mag: np.ndarray, mag_err: np.ndarray | None = None,
               negative: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """AB magnitude (and its error) to flux and flux error in nJy; ``negative`` flips the sign."""
    mag = np.asarray(mag, dtype=np.float64)
    flux = 10.0 ** (-0.4 * (mag - AB_NJY_ZP))
    err = (np.abs(flux) * 0.4 * math.log(10.0) * np.asarray(mag_err, dtype=np.float64)
           if mag_err is not None else np.full_like(flux, np.nan))
    if negative is not None:
        flux = np.where(np.asarray(negative, dtype=bool), -flux, flux)
    return flux, err


def jd_utc_to_mjd_tai(jd: np.ndarray) -> np.ndarray:
    """UTC Julian dates to TAI MJD (astropy, leap seconds included)."""
    from astropy.time import Time

    jd = np.asarray(jd, dtype=np.float64)
    if jd.size == 0:
        return jd.copy()
    return np.asarray(Time(jd, format="jd", scale="utc").tai.mjd, dtype=np.float64)


# --------------------------------------------------------------------------- record readers
def _ztf_rows(alert: dict) -> Iterator[dict]:
    oid = alert.get("objectId")
    cand = alert.get("candidate")
    if not isinstance(cand, dict):
        raise ValidationError("ZTF alert without a 'candidate' record")
    prv = alert.get("prv_candidates")
    prv = [] if prv is None else list(prv)
    for i, c in enumerate([cand] + prv):
        if c is None or c.get("candid") is None or c.get("magpsf") is None:
            continue  # upper limit (non-detection)
        row = {k: c.get(k) for k in _ZTF_FIELDS}
        row["candid"] = str(int(c["candid"]))  # exact: 19-digit ids do not survive float64
        # some Fink Parquet files store prv_candidates.candid as a double (rounded)
        row["_exact"] = isinstance(c["candid"], (int, np.integer))
        row["pid"] = int(c["pid"])
        row["_key"] = f"ztf|{oid}|{row['pid']}|{float(c['candid'])!r}|{c.get('ra')!r}|{c.get('dec')!r}"
        row["objectId"] = oid
        if i > 0:
            row["exptime"] = None
        yield row


def _rubin_rows(alert: dict) -> Iterator[dict]:
    src = alert.get("diaSource")
    if not isinstance(src, dict):
        raise ValidationError("LSST alert without a 'diaSource' record")
    prv = alert.get("prvDiaSources")
    prv = [] if prv is None else list(prv)
    for s in [src] + prv:
        if s is not None:
            yield s


def _kind_of_record(rec: dict) -> str:
    if "candidate" in rec and "objectId" in rec:
        return "ztf"
    if "diaSource" in rec:
        return "lsst"
    raise ValidationError("record is neither a ZTF alert (candidate, objectId) nor an LSST "
                          f"alert (diaSource); fields: {sorted(rec)[:12]}")


def _frame_ztf(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return _empty_sources()
    df = pd.DataFrame(rows)
    neg = df["isdiffpos"].astype("string").isin(["f", "0"]).to_numpy()
    flux, err = mag_to_njy(df["magpsf"].to_numpy(np.float64, na_value=np.nan),
                           df["sigmapsf"].to_numpy(np.float64, na_value=np.nan), neg)
    apf, ape = mag_to_njy(df["magap"].to_numpy(np.float64, na_value=np.nan),
                          df["sigmagap"].to_numpy(np.float64, na_value=np.nan), neg)
    exptime = pd.to_numeric(df["exptime"], errors="coerce").to_numpy(np.float64, na_value=np.nan)
    exptime = np.where(np.isfinite(exptime), exptime, ZTF_DEFAULT_EXPTIME_S)
    jd_mid = df["jd"].to_numpy(np.float64) + exptime / 2.0 / 86400.0
    fid = df["fid"].to_numpy(np.int64)
    band = pd.Series(fid).map(ZTF_BANDS)
    if band.isna().any():
        raise ValidationError(f"ZTF alert with unknown fid {sorted(set(fid[band.isna()]))}")
    pid = df["pid"].to_numpy(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        snr = np.abs(flux) / err
    return pd.DataFrame({
        "exposure_id": pid, "visit": pid,
        "detector": pd.to_numeric(df["rcid"], errors="coerce").fillna(-1).to_numpy(np.int32),
        "band": band.to_numpy(object), "mjd": jd_utc_to_mjd_tai(jd_mid),
        "ra": df["ra"].to_numpy(np.float64), "dec": df["dec"].to_numpy(np.float64),
        "x": pd.to_numeric(df["xpos"], errors="coerce").to_numpy(np.float64) - 1.0,
        "y": pd.to_numeric(df["ypos"], errors="coerce").to_numpy(np.float64) - 1.0,
        "psf_flux": flux, "psf_flux_err": err, "ap_flux": apf, "ap_flux_err": ape,
        "snr": snr,
        "external_id": df["candid"].to_numpy(object),
        "external_object_id": df["objectId"].astype("string").to_numpy(object),
        "_key": df["_key"].to_numpy(object), "_exact": df["_exact"].to_numpy(bool),
    })


_RUBIN_MAP = {"ra": "ra", "dec": "dec", "raErr": "ra_err", "decErr": "dec_err",
              "ra_dec_Cov": "ra_dec_cov", "x": "x", "y": "y", "xErr": "x_err", "yErr": "y_err",
              "psfFlux": "psf_flux", "psfFluxErr": "psf_flux_err", "apFlux": "ap_flux",
              "apFluxErr": "ap_flux_err", "scienceFlux": "science_flux",
              "scienceFluxErr": "science_flux_err", "snr": "snr", "ixx": "ixx", "iyy": "iyy",
              "ixy": "ixy", "midpointMjdTai": "mjd"}


def _frame_rubin(rows: list[dict]) -> pd.DataFrame:
    if not rows:
        return _empty_sources()
    df = pd.DataFrame(rows)
    for need in ("diaSourceId", "visit", "detector", "band", "midpointMjdTai", "ra", "dec"):
        if need not in df.columns:
            raise ValidationError(f"LSST diaSource records lack field {need!r}")
    out = pd.DataFrame({dst: pd.to_numeric(df[src], errors="coerce").to_numpy(
        np.float64, na_value=np.nan) if src in df.columns else np.nan
        for src, dst in _RUBIN_MAP.items()})
    visit = df["visit"].to_numpy(np.int64)
    det = df["detector"].to_numpy(np.int64)
    out["visit"] = visit
    out["detector"] = det.astype(np.int32)
    out["exposure_id"] = exposure_id_of(visit, det)
    out["band"] = df["band"].astype("string").to_numpy(object)
    if "isDipole" in df.columns:
        out["is_dipole"] = df["isDipole"].astype("boolean").to_numpy(object)
    # ids as exact text from the Python ints (19-digit ids do not survive float64)
    out["external_id"] = np.array([str(int(r["diaSourceId"])) for r in rows], dtype=object)
    out["external_object_id"] = np.array(
        [None if r.get("diaObjectId") in (None, 0) else str(int(r["diaObjectId"]))
         for r in rows], dtype=object)  # 0: the source went to a solar-system object
    out["_key"] = np.array(["lsst|" + x for x in out["external_id"]], dtype=object)
    out["_exact"] = True
    return out


def _empty_sources() -> pd.DataFrame:
    return pd.DataFrame({"ra": np.empty(0), "dec": np.empty(0), "mjd": np.empty(0)})


# --------------------------------------------------------------------------- containers
def _read_avro_long(fo) -> int:
    """One zig-zag varint (Avro long) from a binary file object."""
    n = shift = 0
    while True:
        byte = fo.read(1)
        if not byte:
            raise EOFError("truncated Avro block header")
        b = byte[0]
        n |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return (n >> 1) ^ -(n & 1)


def _snappy_block(fo) -> io.BytesIO:
    """fastavro block reader for the 'snappy' codec using pyarrow's Snappy.

    An Avro snappy block is the raw Snappy data followed by a 4-byte CRC32 of
    the uncompressed data; raw Snappy starts with the uncompressed length as a
    varint.
    """
    import zlib

    import pyarrow as pa

    length = _read_avro_long(fo)
    data = fo.read(length - 4)
    crc = fo.read(4)
    size = shift = 0
    for b in data[:10]:
        size |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            break
    out = pa.Codec("snappy").decompress(data, decompressed_size=size).to_pybytes()
    if zlib.crc32(out) & 0xFFFFFFFF != int.from_bytes(crc, "big"):
        raise ValueError("snappy block fails its CRC32 check")
    return io.BytesIO(out)


def _ensure_snappy() -> None:
    """Let fastavro read snappy-compressed Avro (Fink writes it) without cramjam."""
    import fastavro.read

    current = fastavro.read.BLOCK_READERS.get("snappy")
    if current is None or getattr(current, "__name__", "") == "missing":
        fastavro.read.BLOCK_READERS["snappy"] = _snappy_block


def _avro_records(data: bytes, name: str) -> list[dict]:
    import fastavro

    _ensure_snappy()

    try:
        return list(fastavro.reader(io.BytesIO(data)))
    except Exception as exc:  # fastavro raises several types for corrupt data
        raise ValidationError(f"{name}: not a readable Avro container ({exc})") from None


_PARQUET_COLUMNS = {"ztf": ["objectId", "candidate", "prv_candidates"],
                    "lsst": ["diaSource", "prvDiaSources"]}


def _parquet_records(path: str) -> tuple[str, list[dict]]:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except Exception as exc:
        raise ValidationError(f"{path}: not a readable Parquet file ({exc})") from None
    for kind, cols in _PARQUET_COLUMNS.items():
        if all(c in names for c in cols[:2]):
            use = [c for c in cols if c in names]
            table = pq.read_table(path, columns=use)
            return kind, table.to_pylist()
    raise ValidationError(f"{path}: Parquet file has neither ZTF (objectId, candidate) nor "
                          f"LSST (diaSource) alert columns; columns: {names[:12]}")


def _iter_file_records(path: str) -> Iterator[tuple[str, list[dict]]]:
    """(source name, records) for a file: Avro, Parquet, or a tar(.gz) of Avro files."""
    p = Path(path)
    if not p.is_file():
        raise ValidationError(f"{path}: no such alert file")
    with open(p, "rb") as fh:
        head = fh.read(4)
    if head == _AVRO_MAGIC:
        yield str(p), _avro_records(p.read_bytes(), str(p))
    elif head == _PARQUET_MAGIC:
        yield str(p), _parquet_records(str(p))[1]
    elif head[:2] == _GZIP_MAGIC or tarfile.is_tarfile(p):
        try:
            with tarfile.open(p, "r:*") as tar:
                members = [m for m in tar.getmembers() if m.isfile()]
                if not members:
                    raise ValidationError(f"{path}: archive holds no files")
                for m in members:
                    data = tar.extractfile(m).read()
                    if data[:4] != _AVRO_MAGIC:
                        raise ValidationError(f"{path}: member {m.name} is not an Avro alert file")
                    yield f"{p}:{m.name}", _avro_records(data, f"{p}:{m.name}")
        except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
            # a truncated gzip stream ends in EOFError; tarfile's "r:*" lists every method it tried
            why = "; ".join(line.strip("- ") for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
            raise ValidationError(f"{path}: not a readable tar archive ({why})") from None
    else:
        raise ValidationError(f"{path}: not an alert file (expected Avro, Parquet or tar.gz of "
                              f"Avro; first bytes {head!r})")


def _collect(records: Iterable[dict], ztf: list[dict], lsst: list[dict], name: str) -> None:
    for rec in records:
        try:
            if _kind_of_record(rec) == "ztf":
                ztf.extend(_ztf_rows(rec))
            else:
                lsst.extend(_rubin_rows(rec))
        except ValidationError as exc:
            raise ValidationError(f"{name}: {exc}") from None


def _to_frame(ztf: list[dict], lsst: list[dict], assign_ids: bool) -> pd.DataFrame:
    parts = [f for f in (_frame_ztf(ztf), _frame_rubin(lsst)) if len(f)]
    df = pd.concat(parts, ignore_index=True) if parts else _empty_sources()
    return _finish(df, assign_ids)


def _finish(df: pd.DataFrame, assign_ids: bool) -> pd.DataFrame:
    table = load_schema()["dia_source"]
    n0 = len(df)
    if n0:
        # a repeated detection is kept once, preferring a copy with an exact id
        df = df.sort_values("_exact", ascending=False, kind="stable")
        df = df.loc[~df["_key"].duplicated().to_numpy()].reset_index(drop=True)
        df = df.sort_values(["mjd", "external_id"], kind="stable").reset_index(drop=True)
        bad = ~(np.isfinite(df["ra"].to_numpy(np.float64))
                & np.isfinite(df["dec"].to_numpy(np.float64)))
        if bad.any():
            raise ValidationError(f"alert detection(s) without a position: external_id "
                                  f"{df.loc[bad, 'external_id'].tolist()[:5]}")
    log.debug("alerts: %d detections, %d after deduplication", n0, len(df))
    n = len(df)
    out = {}
    for c in table.columns:
        if c.name == "dia_source_id":
            out[c.name] = new_ids(n) if assign_ids else np.zeros(n, np.int64)
        elif c.name == "dia_object_id":
            out[c.name] = pd.array([pd.NA] * n, dtype="Int64")
        elif c.name == "healpix29":
            out[c.name] = (radec_to_healpix29(df["ra"].to_numpy(np.float64),
                                              df["dec"].to_numpy(np.float64))
                           if n else np.empty(0, np.int64))
        elif c.name == "flags":
            out[c.name] = np.zeros(n, np.int64)
        elif c.name == "is_dipole":
            v = df[c.name] if c.name in df.columns else pd.Series([pd.NA] * n)
            out[c.name] = pd.array(v.to_numpy(object), dtype="boolean")
        elif c.type == "string":
            v = df[c.name] if c.name in df.columns else pd.Series([None] * n)
            out[c.name] = pd.array(v.to_numpy(object), dtype="string")
        elif c.numpy_kind == "f":
            v = df[c.name].to_numpy(np.float64, na_value=np.nan) if c.name in df.columns \
                else np.full(n, np.nan)
            out[c.name] = v.astype(np.float32 if c.type == "float32" else np.float64)
        else:
            out[c.name] = df[c.name].to_numpy(
                {"int64": np.int64, "int32": np.int32, "int16": np.int16}[c.type])
    return pd.DataFrame(out)


# --------------------------------------------------------------------------- public API
def read_alert_files(paths: Iterable[str | os.PathLike], *,
                     assign_ids: bool = True) -> pd.DataFrame:
    """Read alert files (any mix of the supported forms) into ``dia_source`` rows.

    Each file is recognised by its content (Avro magic, Parquet magic, gzip/tar).
    Detections repeated across alerts and files are kept once; upper limits are
    skipped.  Raises :class:`~archive.errors.ValidationError` naming the file
    for unreadable or unrecognised input.
    """
    ztf: list[dict] = []
    lsst: list[dict] = []
    count = 0
    for path in paths:
        for name, recs in _iter_file_records(os.fspath(path)):
            _collect(recs, ztf, lsst, name)  # rows only: cutouts are not kept
            count += 1
    if count == 0:
        raise ValidationError("read_alert_files: no files given")
    return _to_frame(ztf, lsst, assign_ids)


def compare_grouping(ours: np.ndarray, theirs: np.ndarray) -> dict[str, float]:
    """Compare two groupings of the same detections (our dia_object_id vs a survey's ids).

    Rows where ``theirs`` is null (no survey object) are left out.

    Returns
    -------
    dict with
      ``exact``: fraction of detections whose group is identical in both
      groupings (same set of detections);
      ``completeness``: fraction of survey objects whose detections all fall
      in one of our objects;
      ``purity``: fraction of our objects whose detections all carry one survey id;
      ``n_ours``, ``n_theirs``: numbers of groups.
    """
    ours = pd.Series(np.asarray(ours, dtype=object))
    theirs = pd.Series(np.asarray(theirs, dtype=object))
    if ours.size != theirs.size:
        raise ValidationError("compare_grouping: groupings of different lengths")
    known = theirs.notna().to_numpy()
    a = pd.factorize(ours[known])[0]
    b = pd.factorize(theirs[known])[0]
    if a.size == 0:
        return {"exact": 1.0, "completeness": 1.0, "purity": 1.0, "n_ours": 0, "n_theirs": 0}
    pairs = pd.DataFrame({"a": a, "b": b})
    n_b_per_a = pairs.groupby("a")["b"].nunique()
    n_a_per_b = pairs.groupby("b")["a"].nunique()
    exact = (n_b_per_a.reindex(a).to_numpy() == 1) & (n_a_per_b.reindex(b).to_numpy() == 1)
    return {"exact": float(exact.mean()),
            "completeness": float((n_a_per_b == 1).mean()),
            "purity": float((n_b_per_a == 1).mean()),
            "n_ours": int(n_b_per_a.size), "n_theirs": int(n_a_per_b.size)}


def survey_radius_arcsec(sources: pd.DataFrame, default: float) -> np.ndarray:
    """Per-row match radius (arcsec): :data:`SURVEY_RADIUS_ARCSEC` for rows whose
    ``external_object_id`` carries a survey's prefix (e.g. ZTF's ``ZTF18abxhyqv``),
    ``default`` for the others.  Stored rows re-associated later get the same radius."""
    out = np.full(len(sources), float(default))
    if "external_object_id" not in sources.columns or not len(sources):
        return out
    ext = sources["external_object_id"].astype("string")
    for prefix, radius in SURVEY_RADIUS_ARCSEC.items():
        out[ext.str.startswith(prefix).fillna(False).to_numpy(bool)] = float(radius)
    return out
