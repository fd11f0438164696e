"""Incremental DIAObject summaries from running sums (pure, columnar, no I/O).

A ``dia_object`` row carries running sums next to the summaries derived from
them, so a batch of DIASources updates its objects at a cost proportional to
the batch, not to the history:

* position: ``pos_sum_w`` = sum w, ``pos_sum_w{x,y,z}`` = sum w * unit vector,
  ``pos_sum_wt`` = sum w * mjd, with w = 1/sigma^2 (deg^-2) and
  sigma^2 = (ra_err^2 + dec_err^2) / 2, where ``ra_err`` is the error *on the
  sky* (of ra*cos(dec), in degrees of arc, as the schema says and as
  :mod:`archive.process.characterize` and LSST's raErr give it) -- never
  multiplied by cos(dec) again.  A source without errors gets ``DEFAULT_POS_ERR_ARCSEC``, so a
  batch without any errors is averaged with equal weights.
* per band, PSF flux of the DIASources (``{band}_psf_flux_*``) and forced PSF
  flux of the dia_forced_source rows (``{band}_forced_flux_*``): ``sum_w`` =
  sum 1/err^2, ``sum_wf``, ``sum_wff``, ``sum_f``, ``sum_ff`` and ``ndata``.
  Only rows with a finite flux and a finite, positive error count.

Derived by :func:`finalize`:

* ra, dec: direction of the weighted mean unit vector; ``dec_err`` =
  1/sqrt(pos_sum_w) (deg), ``ra_err`` = dec_err (on the sky, isotropic);
  ``ra_dec_cov`` = 0 (isotropic per-source errors); ``radec_mjd`` =
  pos_sum_wt / pos_sum_w; ``healpix29`` of (ra, dec).
* flux mean = sum_wf/sum_w, mean_err = 1/sqrt(sum_w), chi2 = sum_wff -
  sum_wf^2/sum_w (chi^2 about the weighted mean), sigma = sample standard
  deviation (ddof=1, NaN for fewer than 2 values) from sum_f, sum_ff, ndata.

Extremes (first/last MJD, flux min/max) are kept directly: adding updates them
with min/max; removing a contribution (``sign=-1``, for ``--replace``) cannot
undo them, so :func:`apply_sources` / :func:`apply_forced` report the objects
whose extremes may have changed (``stale``) and :func:`recompute_extrema`
recomputes those from their remaining rows.  :func:`recompute` is the
independent full recompute from all rows (pandas group-by statistics) that the
incremental path must equal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from archive.catalog.association import DUPLICATE_FLAG
from archive.catalog.schema import load_schema
from archive.errors import ValidationError
from archive.sky.healpix import radec_to_healpix29, radec_to_vec, vec_to_radec

#: Positional error (arcsec, per axis) assumed for a DIASource without errors.
DEFAULT_POS_ERR_ARCSEC = 0.1

_NUMPY = {"int16": np.int16, "int32": np.int32, "int64": np.int64, "float32": np.float32,
          "float64": np.float64, "bool": np.bool_}
_POS_SUMS = ("pos_sum_w", "pos_sum_wx", "pos_sum_wy", "pos_sum_wz", "pos_sum_wt")
_FLUX_SUMS = ("sum_w", "sum_wf", "sum_wff", "sum_f", "sum_ff")
_KINDS = {"psf": "psf_flux", "forced": "forced_flux"}


def _table():
    return load_schema()["dia_object"]


def _bands() -> tuple[str, ...]:
    return load_schema().bands


def empty_objects(n: int = 0) -> pd.DataFrame:
    """A ``dia_object`` frame of ``n`` rows with every schema column and dtype.

    Sums and counts are 0, floats NaN, ids 0.
    """
    cols = {}
    for c in _table().columns:
        if c.type == "string":
            cols[c.name] = pd.Series([None] * n, dtype="string")
        elif c.type == "timestamp":
            cols[c.name] = pd.Series(pd.NaT, index=range(n), dtype="datetime64[us, UTC]")
        elif c.numpy_kind == "f":
            zero = "_sum_" in c.name
            cols[c.name] = np.full(n, 0.0 if zero else np.nan, dtype=_NUMPY[c.type])
        else:
            cols[c.name] = np.zeros(n, dtype=_NUMPY[c.type])
    return pd.DataFrame(cols)


def _check_objects(objects: pd.DataFrame) -> None:
    missing = [c for c in _table().column_names if c not in objects.columns]
    if missing:
        raise ValidationError(f"dia_object frame lacks schema columns {missing[:8]}"
                              f"{' ...' if len(missing) > 8 else ''}")
    if objects["dia_object_id"].duplicated().any():
        dup = objects.loc[objects["dia_object_id"].duplicated(), "dia_object_id"].iloc[0]
        raise ValidationError(f"dia_object frame holds dia_object_id {dup} more than once "
                              "(pass only the current version of each object)")


def _num(df: pd.DataFrame, name: str, what: str, required: bool = True) -> np.ndarray:
    if name not in df.columns:
        if required:
            raise ValidationError(f"{what}: missing column {name!r}")
        return np.full(len(df), np.nan)
    return pd.to_numeric(df[name], errors="coerce").to_numpy(np.float64, na_value=np.nan)


def _ids(df: pd.DataFrame, what: str) -> np.ndarray:
    if "dia_object_id" not in df.columns:
        raise ValidationError(f"{what}: missing column 'dia_object_id'")
    ids = df["dia_object_id"]
    if ids.isna().any():
        raise ValidationError(f"{what}: dia_object_id is missing in "
                              f"{int(ids.isna().sum())} row(s); associate them first")
    return ids.to_numpy(np.int64)


def _band_codes(df: pd.DataFrame, what: str) -> np.ndarray:
    """Index into schema bands per row; rows with an unknown band raise."""
    if "band" not in df.columns:
        raise ValidationError(f"{what}: missing column 'band'")
    bands = _bands()
    b = df["band"].astype("string")
    code = pd.Index(bands).get_indexer(b.fillna("").to_numpy(object))
    if (code < 0).any():
        bad = sorted(set(b[code < 0].fillna("<null>").tolist()))[:5]
        raise ValidationError(f"{what}: unknown band(s) {bad}; the schema bands are {list(bands)}")
    return code


def position_weights(sources: pd.DataFrame) -> np.ndarray:
    """Per-source position weight w = 1/sigma^2 in deg^-2 (see module docstring)."""
    ra_err = _num(sources, "ra_err", "sources", required=False)  # on the sky (deg of arc)
    dec_err = _num(sources, "dec_err", "sources", required=False)
    var = (ra_err ** 2 + dec_err ** 2) / 2.0
    default = (DEFAULT_POS_ERR_ARCSEC / 3600.0) ** 2
    var = np.where(np.isfinite(var) & (var > 0), var, default)
    return 1.0 / var


def primary(sources: pd.DataFrame) -> np.ndarray:
    """Rows that enter the summaries: all but duplicates of a visit (``flags`` with
    :data:`archive.catalog.association.DUPLICATE_FLAG` set; see that module)."""
    if "flags" not in sources.columns or len(sources) == 0:
        return np.ones(len(sources), dtype=bool)
    flags = pd.to_numeric(sources["flags"], errors="coerce").fillna(0).to_numpy(np.int64)
    return (flags & DUPLICATE_FLAG) == 0


def _primary_only(sources: pd.DataFrame) -> pd.DataFrame:
    keep = primary(sources)
    return sources if keep.all() else sources.loc[keep]


@dataclass
class SummaryUpdate:
    """Result of :func:`apply_sources` / :func:`apply_forced`.

    objects : the updated ``dia_object`` rows (sums, counts and extremes; call
        :func:`finalize` for the derived columns).
    stale : int64 ids of objects whose extremes (first/last MJD, min/max) may be
        wrong after a removal; fix with :func:`recompute_extrema`.  Empty when
        adding.
    emptied : int64 ids of objects left with no DIASources after a removal.
    touched : int64 ids of the objects whose rows changed (new ones included);
        these are the rows to write as new versions.
    """

    objects: pd.DataFrame
    stale: np.ndarray
    emptied: np.ndarray
    touched: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))


def _to_cols(objects: pd.DataFrame) -> dict[str, np.ndarray]:
    """Schema columns as writable numpy arrays (floats as float64, integers as int64)."""
    out: dict[str, np.ndarray] = {}
    table = _table()
    fcols = [c.name for c in table.columns if c.numpy_kind == "f"]
    icols = [c.name for c in table.columns if c.numpy_kind in "ib"]
    try:
        fl = np.ascontiguousarray(
            objects[fcols].to_numpy(np.float64, na_value=np.nan).T)
    except (TypeError, ValueError) as exc:
        raise ValidationError(f"dia_object frame: non-numeric float column: {exc}") from None
    out.update(zip(fcols, fl))
    ints = objects[icols]
    if ints.isna().to_numpy().any():
        ints = ints.fillna(0)
    out.update(zip(icols, np.ascontiguousarray(ints.to_numpy(np.int64).T)))
    for c in table.columns:
        if c.name not in out:
            out[c.name] = objects[c.name].to_numpy(copy=True)
    return {c.name: out[c.name] for c in table.columns}


def _rows_for(cols: dict[str, np.ndarray], ids: np.ndarray, sign: int, what: str,
              create: bool) -> np.ndarray:
    """Row positions of ``ids`` in ``cols``, appending new (empty) rows when allowed."""
    index = pd.Index(cols["dia_object_id"])
    pos = index.get_indexer(ids)
    missing = pos < 0
    if missing.any():
        if not create or sign < 0:
            bad = np.unique(ids[missing])[:5].tolist()
            raise ValidationError(f"{what}: dia_object_id {bad} not in the given objects")
        new_ids = np.unique(ids[missing])
        extra = _to_cols(empty_objects(new_ids.size))
        extra["dia_object_id"] = new_ids
        for k in cols:
            cols[k] = np.concatenate([cols[k], extra[k]])
        pos = pd.Index(cols["dia_object_id"]).get_indexer(ids)
    return pos


def _flux_sums(out: dict[str, np.ndarray], pos: np.ndarray, band: np.ndarray,
               flux: np.ndarray, err: np.ndarray, kind: str, sign: int) -> np.ndarray:
    """Add (sign=+1) or remove per-band flux sums; returns rows whose min/max may be stale."""
    n = out["dia_object_id"].size
    stale = np.zeros(n, dtype=bool)
    ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
    w = np.where(ok, 1.0 / np.where(ok, err, 1.0) ** 2, 0.0)
    f = np.where(ok, flux, 0.0)
    for bi, b in enumerate(_bands()):
        sel = ok & (band == bi)
        if not sel.any():
            continue
        p = pos[sel]
        pre = f"{b}_{_KINDS[kind]}"
        ws, fs = w[sel], f[sel]
        vals = {"sum_w": ws, "sum_wf": ws * fs, "sum_wff": ws * fs * fs, "sum_f": fs,
                "sum_ff": fs * fs}
        for sname, v in vals.items():
            out[f"{pre}_{sname}"] += sign * np.bincount(p, weights=v, minlength=n)
        nd = out[f"{pre}_ndata"]
        nd += sign * np.bincount(p, minlength=n)
        if (nd < 0).any():
            raise ValidationError(f"removing {kind} fluxes that were never added "
                                  f"(band {b}, dia_object_id "
                                  f"{out['dia_object_id'][nd < 0][:3].tolist()})")
        _extremes(out[f"{pre}_min"], out[f"{pre}_max"], p, fs, sign, stale, nd == 0,
                  [out[f"{pre}_{sname}"] for sname in _FLUX_SUMS])
    return stale


def _extremes(lo: np.ndarray, hi: np.ndarray, pos: np.ndarray, values: np.ndarray, sign: int,
              stale: np.ndarray, gone: np.ndarray, sums: list[np.ndarray]) -> None:
    """Running extremes, in place: adding widens [lo, hi] at rows ``pos``; removing a value
    that was an extreme marks its row ``stale`` (:func:`recompute_extrema` redoes it), and
    rows left without data (``gone``) get NaN extremes and exact-zero ``sums`` (not
    rounding residue)."""
    if sign > 0:
        np.fmin.at(lo, pos, values)
        np.fmax.at(hi, pos, values)
        return
    hit = (values <= lo[pos]) | (values >= hi[pos])
    stale[pos[hit]] = True
    lo[gone] = np.nan
    hi[gone] = np.nan
    for col in sums:
        col[gone] = 0.0


def apply_sources(objects: pd.DataFrame, sources: pd.DataFrame, sign: int = +1, *,
                  validity_start: float | None = None) -> SummaryUpdate:
    """Add (``sign=+1``) or remove (``sign=-1``) DIASources' contributions to their objects.

    Parameters
    ----------
    objects : current ``dia_object`` rows (all schema columns, one row per id).
        May be empty.  When adding, ids not present get new rows.
    sources : dia_source rows with ``dia_object_id``, ``ra``, ``dec`` (deg),
        ``mjd`` (TAI), ``band``, ``psf_flux``, ``psf_flux_err`` (nJy) and
        optional ``ra_err``, ``dec_err`` (deg, on the sky) and ``flags``; rows
        flagged as duplicates of a visit are skipped (:func:`primary`).
    sign : +1 to add, -1 to remove a contribution added before.
    validity_start : when given, every touched object gets this MJD as its
        ``validity_start`` and a null ``validity_end`` (a new version).

    Returns a :class:`SummaryUpdate`; the derived columns are *not* updated:
    call :func:`finalize` (after :func:`recompute_extrema` for ``stale`` ids).
    Rows of ``objects`` not touched are returned unchanged.
    """
    if sign not in (1, -1):
        raise ValidationError(f"sign must be +1 or -1, got {sign}")
    _check_objects(objects)
    sources = _primary_only(sources)
    ids = _ids(sources, "sources")
    out = _to_cols(objects)
    pos = _rows_for(out, ids, sign, "sources", create=True)
    n = out["dia_object_id"].size
    ra = _num(sources, "ra", "sources")
    dec = _num(sources, "dec", "sources")
    mjd = _num(sources, "mjd", "sources")
    if not (np.isfinite(ra).all() and np.isfinite(dec).all() and np.isfinite(mjd).all()):
        raise ValidationError("sources: ra, dec and mjd must be finite in every row")
    w = position_weights(sources)
    x, y, z = radec_to_vec(ra, dec).T
    for col, v in zip(_POS_SUMS, (w, w * x, w * y, w * z, w * mjd)):
        out[col] += sign * np.bincount(pos, weights=v, minlength=n)
    cnt = out["n_dia_sources"]
    cnt += sign * np.bincount(pos, minlength=n)
    if (cnt < 0).any():
        raise ValidationError("removing DIASources that were never added to dia_object_id "
                              f"{out['dia_object_id'][cnt < 0][:3].tolist()}")
    stale = np.zeros(n, dtype=bool)
    _extremes(out["first_mjd"], out["last_mjd"], pos, mjd, sign, stale, cnt == 0, [out[c] for c in _POS_SUMS])
    band = _band_codes(sources, "sources")
    stale |= _flux_sums(out, pos, band, _num(sources, "psf_flux", "sources", False),
                        _num(sources, "psf_flux_err", "sources", False), "psf", sign)
    touched = np.zeros(n, dtype=bool)
    touched[pos] = True
    if validity_start is not None:
        _stamp(out, touched, validity_start)
    oid = out["dia_object_id"]
    emptied = oid[touched & (cnt == 0)] if sign < 0 else np.empty(0, np.int64)
    return SummaryUpdate(_conform(out), oid[stale & (cnt > 0)].copy(), emptied.copy(),
                         oid[touched].copy())


def apply_forced(objects: pd.DataFrame, forced: pd.DataFrame, sign: int = +1, *,
                 validity_start: float | None = None) -> SummaryUpdate:
    """Add or remove dia_forced_source rows (``dia_object_id``, ``band``, ``psf_flux``,
    ``psf_flux_err`` in nJy) to the ``{band}_forced_flux_*`` sums of known objects."""
    if sign not in (1, -1):
        raise ValidationError(f"sign must be +1 or -1, got {sign}")
    _check_objects(objects)
    ids = _ids(forced, "forced sources")
    out = _to_cols(objects)
    pos = _rows_for(out, ids, sign, "forced sources", create=False)
    band = _band_codes(forced, "forced sources")
    stale = _flux_sums(out, pos, band, _num(forced, "psf_flux", "forced sources"),
                       _num(forced, "psf_flux_err", "forced sources"), "forced", sign)
    touched = np.zeros(out["dia_object_id"].size, dtype=bool)
    touched[pos] = True
    if validity_start is not None:
        _stamp(out, touched, validity_start)
    return SummaryUpdate(_conform(out), out["dia_object_id"][stale].copy(),
                         np.empty(0, np.int64), out["dia_object_id"][touched].copy())


def _stamp(out: dict[str, np.ndarray], touched: np.ndarray, validity_start: float) -> None:
    out["validity_start"][touched] = float(validity_start)
    out["validity_end"][touched] = np.nan


def _group_extrema(pos: np.ndarray, values: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    mn = np.full(n, np.nan)
    mx = np.full(n, np.nan)
    ok = np.isfinite(values)
    np.fmin.at(mn, pos[ok], values[ok])
    np.fmax.at(mx, pos[ok], values[ok])
    return mn, mx


def recompute_extrema(objects: pd.DataFrame, sources: pd.DataFrame,
                      forced: pd.DataFrame | None = None,
                      ids: np.ndarray | None = None) -> pd.DataFrame:
    """Recompute first/last MJD and per-band min/max of the objects ``ids``.

    ``sources`` (and ``forced``, for the forced-flux extremes) must hold *all*
    remaining rows of those objects; rows of other objects, and duplicates of a
    visit (:func:`primary`), are ignored.
    ``ids`` defaults to every object in ``objects``.  Returns a new frame.
    """
    _check_objects(objects)
    sources = _primary_only(sources)
    out = _to_cols(objects)
    oid = out["dia_object_id"]
    ids = oid if ids is None else np.asarray(ids, dtype=np.int64)
    which = np.isin(oid, ids)
    n = oid.size
    index = pd.Index(oid)

    def fix(frame: pd.DataFrame, kind: str | None, what: str) -> None:
        fid = _ids(frame, what)
        p = index.get_indexer(fid)
        keep = (p >= 0) & which[np.maximum(p, 0)]
        f = frame.loc[keep]
        p = p[keep]
        if kind is None:
            mn, mx = _group_extrema(p, _num(f, "mjd", what), n)
            out["first_mjd"][which] = mn[which]
            out["last_mjd"][which] = mx[which]
            return
        band = _band_codes(f, what)
        flux, err = _num(f, "psf_flux", what, False), _num(f, "psf_flux_err", what, False)
        ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
        for bi, b in enumerate(_bands()):
            sel = ok & (band == bi)
            mn, mx = _group_extrema(p[sel], flux[sel], n)
            out[f"{b}_{_KINDS[kind]}_min"][which] = mn[which]
            out[f"{b}_{_KINDS[kind]}_max"][which] = mx[which]

    fix(sources, None, "sources")
    fix(sources, "psf", "sources")
    if forced is not None:
        fix(forced, "forced", "forced sources")
    return _conform(out)


def finalize(objects: pd.DataFrame) -> pd.DataFrame:
    """Derive positions, errors, HEALPix index and flux statistics from the sums.

    Returns a new frame with every ``dia_object`` schema column in schema order
    and dtype.  Objects without sources keep NaN positions (and healpix29 0);
    the store should not write them as current versions.
    """
    _check_objects(objects)
    return _conform(_derive(_to_cols(objects)))


def _derive(out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    sw = out["pos_sum_w"]
    has = (out["n_dia_sources"] > 0) & (sw > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mx = out["pos_sum_wx"] / sw
        my = out["pos_sum_wy"] / sw
        mz = out["pos_sum_wz"] / sw
        ra, dec = vec_to_radec(np.stack([mx, my, mz], axis=-1))
        err = np.sqrt(1.0 / sw)
        radec_mjd = out["pos_sum_wt"] / sw
    out["ra"] = np.where(has, ra, np.nan)
    out["dec"] = np.where(has, dec, np.nan)
    out["dec_err"] = np.where(has, err, np.nan)
    out["ra_err"] = np.where(has, err, np.nan)  # on the sky, as dec_err
    out["ra_dec_cov"] = np.where(has, 0.0, np.nan)
    out["radec_mjd"] = np.where(has, radec_mjd, np.nan)
    hp29 = np.zeros(sw.size, dtype=np.int64)
    if has.any():
        hp29[has] = radec_to_healpix29(ra[has], dec[has])
    out["healpix29"] = hp29
    for b in _bands():
        for kind in _KINDS.values():
            pre = f"{b}_{kind}"
            n = out[f"{pre}_ndata"].astype(np.float64)
            w = out[f"{pre}_sum_w"]
            wf = out[f"{pre}_sum_wf"]
            wff = out[f"{pre}_sum_wff"]
            f = out[f"{pre}_sum_f"]
            ff = out[f"{pre}_sum_ff"]
            ok = (n > 0) & (w > 0)
            with np.errstate(invalid="ignore", divide="ignore"):
                out[f"{pre}_mean"] = np.where(ok, wf / w, np.nan)
                out[f"{pre}_mean_err"] = np.where(ok, 1.0 / np.sqrt(w), np.nan)
                out[f"{pre}_chi2"] = np.where(ok, np.maximum(wff - wf * wf / w, 0.0), np.nan)
                var = (ff - f * f / n) / (n - 1.0)
                out[f"{pre}_sigma"] = np.where(n >= 2, np.sqrt(np.maximum(var, 0.0)), np.nan)
    return out


def _conform(cols: dict[str, np.ndarray]) -> pd.DataFrame:
    """A DataFrame with the schema's column order and dtypes."""
    data = {}
    for c in _table().columns:
        v = cols[c.name]
        data[c.name] = np.asarray(v, dtype=_NUMPY[c.type]) if c.type in _NUMPY else v
    return pd.DataFrame(data, copy=False)


def new_objects(sources_with_ids: pd.DataFrame, validity_start: float,
                forced: pd.DataFrame | None = None) -> pd.DataFrame:
    """Finalized ``dia_object`` rows for the objects of ``sources_with_ids``.

    Every distinct ``dia_object_id`` of the sources becomes one row (version
    starting at ``validity_start``, MJD TAI), built from those sources only
    (and ``forced`` rows of the same objects, if given).
    """
    upd = apply_sources(empty_objects(0), sources_with_ids, validity_start=validity_start)
    objects = upd.objects
    if forced is not None and len(forced):
        objects = apply_forced(objects, forced).objects
    return finalize(objects)


def recompute(all_sources: pd.DataFrame, all_forced: pd.DataFrame | None = None,
              validity_start: float = np.nan) -> pd.DataFrame:
    """Full recompute of ``dia_object`` rows from all their DIASources (and forced rows).

    Independent of the incremental path (pandas group-by statistics), used to
    check it and to rebuild an object from its history.  Duplicates of a visit
    (:func:`primary`) are left out, as the incremental path leaves them out.
    """
    all_sources = _primary_only(all_sources)
    ids = _ids(all_sources, "sources")
    uid, inv = np.unique(ids, return_inverse=True)
    n = uid.size
    out = _to_cols(empty_objects(n))
    out["dia_object_id"] = uid
    out["validity_start"][:] = float(validity_start)
    ra = _num(all_sources, "ra", "sources")
    dec = _num(all_sources, "dec", "sources")
    mjd = _num(all_sources, "mjd", "sources")
    w = position_weights(all_sources)
    x, y, z = radec_to_vec(ra, dec).T
    g = pd.DataFrame({"k": inv, "w": w, "wx": w * x, "wy": w * y, "wz": w * z,
                      "wt": w * mjd, "mjd": mjd}).groupby("k")
    s = g.sum()
    for col, src in zip(_POS_SUMS, ("w", "wx", "wy", "wz", "wt")):
        out[col] = s[src].reindex(range(n)).to_numpy()
    out["n_dia_sources"] = g.size().reindex(range(n)).to_numpy().astype(np.int32)
    out["first_mjd"] = g["mjd"].min().reindex(range(n)).to_numpy()
    out["last_mjd"] = g["mjd"].max().reindex(range(n)).to_numpy()

    def fluxes(frame: pd.DataFrame, kind: str, what: str) -> None:
        fid = _ids(frame, what)
        p = np.searchsorted(uid, fid)
        if ((p >= n) | (uid[np.minimum(p, n - 1)] != fid)).any():
            raise ValidationError(f"{what}: rows for objects without DIASources")
        band = _band_codes(frame, what)
        flux = _num(frame, "psf_flux", what, kind == "forced")
        err = _num(frame, "psf_flux_err", what, kind == "forced")
        ok = np.isfinite(flux) & np.isfinite(err) & (err > 0)
        for bi, b in enumerate(_bands()):
            sel = ok & (band == bi)
            if not sel.any():
                continue
            pre = f"{b}_{_KINDS[kind]}"
            f, e = flux[sel], err[sel]
            wt = 1.0 / e ** 2
            gg = pd.DataFrame({"k": p[sel], "f": f, "w": wt, "wf": wt * f,
                               "wff": wt * f * f, "ff": f * f}).groupby("k")
            sums = gg.sum()
            idx = sums.index.to_numpy()
            cnt = gg.size().to_numpy()
            for col, v in (("sum_w", sums["w"]), ("sum_wf", sums["wf"]),
                           ("sum_wff", sums["wff"]), ("sum_f", sums["f"]),
                           ("sum_ff", sums["ff"])):
                out[f"{pre}_{col}"][idx] = v.to_numpy()
            mean = (sums["wf"] / sums["w"]).to_numpy()
            # chi2 directly about the weighted mean (not from the sums)
            dev = f - mean[np.searchsorted(idx, p[sel])]
            chi2 = np.bincount(np.searchsorted(idx, p[sel]), weights=wt * dev * dev,
                               minlength=idx.size)
            std = gg["f"].std(ddof=1).to_numpy()
            for col, v, dt in (("mean", mean, np.float64),
                               ("mean_err", 1.0 / np.sqrt(sums["w"].to_numpy()), np.float64),
                               ("chi2", chi2, np.float64), ("sigma", std, np.float64),
                               ("min", gg["f"].min().to_numpy(), np.float64),
                               ("max", gg["f"].max().to_numpy(), np.float64),
                               ("ndata", cnt, np.int32)):
                out[f"{pre}_{col}"][idx] = v

    fluxes(all_sources, "psf", "sources")
    if all_forced is not None and len(all_forced):
        fluxes(all_forced, "forced", "forced sources")
    # positions: mean unit vector
    sw = out["pos_sum_w"]
    mxyz = np.stack([out[c] / sw for c in _POS_SUMS[1:4]], axis=1)
    ra_o, dec_o = vec_to_radec(mxyz)
    out["ra"] = ra_o
    out["dec"] = dec_o
    out["dec_err"] = np.sqrt(1.0 / sw)
    out["ra_err"] = np.sqrt(1.0 / sw)  # on the sky
    out["ra_dec_cov"] = np.zeros(n)
    out["radec_mjd"] = out["pos_sum_wt"] / sw
    out["healpix29"] = radec_to_healpix29(ra_o, dec_o) if n else np.empty(0, np.int64)
    return _conform(out)
