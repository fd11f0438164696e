"""Matched sources over epochs and relative photometry (as LAST's MatchedSources).

Pure and columnar: per-epoch direct-image ``source`` rows in, ``matched_source``
rows, zero points, diagnostics and epoch x source matrices out.

* :func:`match_sources` runs the same optimal association as DIASources
  (:func:`archive.catalog.association.associate`) on ``source`` rows against
  known ``matched_source`` rows; epochs in one batch are associated in time
  order.
* :func:`relative_zero_points` solves, per band, the model
  ``m[i, j] = M[i] + Z[j]`` (source i, epoch j = exposure) by weighted least
  squares over sources seen on enough epochs, with iterative clipping of
  outlying points and of variable sources; the offsets are fixed by
  ``median(Z) = 0`` within each band.  :func:`apply_zero_points` divides the
  fluxes by ``10**(-0.4 Z)``.
* :func:`rms_vs_mag` is the field diagnostic (per source: mean magnitude, rms
  about it, n), with :func:`plot_rms_vs_mag`.
* :func:`epoch_matrix` gives the epochs x sources matrix of any column (NaN
  where a source was not seen); :func:`export_matrix` writes it to Parquet or
  HDF5.
* :func:`summarize` builds ``matched_source`` rows (schema columns) from all
  the (corrected) detections of each matched source.

Magnitudes here are AB: ``m = 31.4 - 2.5 log10(flux / nJy)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from archive.catalog.association import AssociationResult, associate
from archive.catalog.ids import new_ids
from archive.catalog.schema import load_schema
from archive.catalog.summaries import position_weights
from archive.errors import ValidationError
from archive.sky.healpix import radec_to_healpix29, radec_to_vec, vec_to_radec

log = logging.getLogger(__name__)

AB_NJY_ZP = 31.4
_MAG_ERR = 2.5 / np.log(10.0)


def _need(df: pd.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValidationError(f"{what}: missing column(s) {missing}")


def match_sources(sources: pd.DataFrame, matched: pd.DataFrame, radius_arcsec: float = 1.0,
                  *, use_errors: bool = True,
                  id_factory: Callable[[int], np.ndarray] = new_ids) -> AssociationResult:
    """Associate direct-image ``source`` rows with known ``matched_source`` rows.

    ``matched`` needs ``matched_source_id``, ``ra``, ``dec`` (optionally errors
    and ``healpix29``); may be empty.  Returns the association result, whose
    ``dia_object_id`` holds the matched_source_id of every source (new ids for
    sources that start a new matched source).
    """
    _need(sources, ["ra", "dec"], "sources")
    objs = matched.rename(columns={"matched_source_id": "dia_object_id"})
    if len(objs):
        _need(objs, ["dia_object_id", "ra", "dec"], "matched sources")
    else:
        objs = pd.DataFrame({"dia_object_id": np.empty(0, np.int64), "ra": [], "dec": []})
    # two sources of one epoch are two stars (no duplicates to attach); a plain radius gate
    return associate(sources, objs, radius_arcsec, use_errors, same_visit="found", max_chi2=None,
                     id_factory=id_factory)


def _mags(flux: np.ndarray, err: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with np.errstate(divide="ignore", invalid="ignore"):
        ok = (flux > 0) & np.isfinite(flux) & np.isfinite(err) & (err > 0)
        mag = np.where(ok, AB_NJY_ZP - 2.5 * np.log10(np.where(ok, flux, 1.0)), np.nan)
        merr = np.where(ok, _MAG_ERR * err / np.where(ok, flux, 1.0), np.nan)
    return mag, merr


@dataclass
class ZeroPointFit:
    """Result of :func:`relative_zero_points`.

    zero_points : DataFrame, one row per (band, exposure_id): ``zp`` (mag, to
        subtract from observed magnitudes), ``zp_err`` (mag), ``n_stars``.
    reference : ids of the matched sources used as constant stars.
    rms_before, rms_after : median over reference stars of the magnitude rms
        about their mean, before and after correction (mag).
    """

    zero_points: pd.DataFrame
    reference: np.ndarray
    rms_before: float
    rms_after: float


def relative_zero_points(sources: pd.DataFrame, *, min_epochs: int = 3,
                         max_mag_err: float = 0.05, clip: float = 4.0,
                         max_var_chi2: float = 3.0, n_clip: int = 4,
                         tol: float = 1e-7, max_iter: int = 500) -> ZeroPointFit:
    """Solve each epoch's zero-point offset from the constant stars of a field.

    Parameters
    ----------
    sources : rows with ``matched_source_id``, ``exposure_id``, ``band``,
        ``psf_flux``, ``psf_flux_err`` (nJy).
    min_epochs : a star must be measured on at least this many epochs.
    max_mag_err : only measurements with magnitude error below this (mag).
    clip : points with |residual| > clip * sigma are rejected (sigma = the
        point's error combined with the robust scatter of the residuals).
    max_var_chi2 : stars whose reduced chi^2 about the model exceeds this are
        treated as variable and dropped from the solution.
    n_clip : clipping passes.

    The least-squares solution of ``m = M_star + Z_epoch`` is found by
    alternating weighted means (block coordinate descent, exact for this
    separable problem) until the offsets change by less than ``tol`` mag.
    """
    _need(sources, ["matched_source_id", "exposure_id", "band", "psf_flux", "psf_flux_err"],
          "sources")
    mag, merr = _mags(sources["psf_flux"].to_numpy(np.float64, na_value=np.nan),
                      sources["psf_flux_err"].to_numpy(np.float64, na_value=np.nan))
    star_all = sources["matched_source_id"].to_numpy(np.int64, na_value=-1)
    epoch_all = sources["exposure_id"].to_numpy(np.int64)
    band_all = sources["band"].astype("string").to_numpy(object)
    out_rows = []
    ref_ids: list[np.ndarray] = []
    before, after = [], []
    for band in sorted(set(band_all.tolist())):
        inb = band_all == band
        use = inb & np.isfinite(mag) & (merr < max_mag_err) & (star_all >= 0)
        star_u, star = np.unique(star_all[use], return_inverse=True)
        ep_u, ep = np.unique(epoch_all[inb], return_inverse=True)
        ep_of_use = np.searchsorted(ep_u, epoch_all[use])
        m, w0 = mag[use], 1.0 / merr[use] ** 2
        ns, ne = star_u.size, ep_u.size
        keep = np.ones(m.size, dtype=bool)
        # stars on too few epochs carry no information on Z
        cnt = np.bincount(star, minlength=ns)
        keep &= cnt[star] >= min_epochs
        Z = np.zeros(ne)
        M = np.zeros(ns)
        good_star = np.ones(ns, dtype=bool)
        for _pass in range(n_clip + 1):
            w = np.where(keep & good_star[star], w0, 0.0)
            Z, M = _solve_alternating(m, w, star, ep_of_use, ns, ne, Z, tol, max_iter)
            res = m - M[star] - Z[ep_of_use]
            sel = w > 0
            if not sel.any():
                break
            robust = 1.4826 * np.median(np.abs(res[sel] - np.median(res[sel])))
            sig = np.sqrt(merr[use] ** 2 + robust ** 2)
            new_keep = keep & (np.abs(res) <= clip * sig)
            dof = np.maximum(np.bincount(star, weights=(w > 0).astype(float), minlength=ns)
                             - 1.0, 1.0)
            chi2 = np.bincount(star, weights=np.where(w > 0, res ** 2 / sig ** 2, 0.0),
                               minlength=ns) / dof
            new_good = good_star & (chi2 <= max_var_chi2)
            if (new_keep == keep).all() and (new_good == good_star).all():
                break
            keep, good_star = new_keep, new_good
        w = np.where(keep & good_star[star], w0, 0.0)
        n_st = np.bincount(ep_of_use, weights=(w > 0).astype(float), minlength=ne)
        zerr = 1.0 / np.sqrt(np.maximum(np.bincount(ep_of_use, weights=w, minlength=ne),
                                        1e-300))
        zerr[n_st == 0] = np.nan
        Z[n_st == 0] = np.nan
        shift = np.nanmedian(Z) if np.isfinite(Z).any() else 0.0
        Z = Z - shift
        out_rows.append(pd.DataFrame({"band": band, "exposure_id": ep_u, "zp": Z,
                                      "zp_err": zerr, "n_stars": n_st.astype(np.int32)}))
        ref = (np.bincount(star, weights=(w > 0).astype(float), minlength=ns) >= min_epochs)
        ref_ids.append(star_u[ref])
        if ref.any():
            sel = ref[star] & (w > 0)
            before.append(_median_rms(m[sel], star[sel], ns))
            zc = np.nan_to_num(Z[ep_of_use[sel]])
            after.append(_median_rms(m[sel] - zc, star[sel], ns))
    zp = pd.concat(out_rows, ignore_index=True) if out_rows else pd.DataFrame(
        columns=["band", "exposure_id", "zp", "zp_err", "n_stars"])
    return ZeroPointFit(zp, np.concatenate(ref_ids) if ref_ids else np.empty(0, np.int64),
                        float(np.nanmedian(before)) if before else np.nan,
                        float(np.nanmedian(after)) if after else np.nan)


def _solve_alternating(m, w, star, ep, ns, ne, Z, tol, max_iter):
    sw_s = np.bincount(star, weights=w, minlength=ns)
    sw_e = np.bincount(ep, weights=w, minlength=ne)
    M = np.zeros(ns)
    with np.errstate(invalid="ignore", divide="ignore"):
        for _ in range(max_iter):
            M = np.bincount(star, weights=w * (m - Z[ep]), minlength=ns) / sw_s
            M = np.where(sw_s > 0, M, 0.0)
            Zn = np.bincount(ep, weights=w * (m - M[star]), minlength=ne) / sw_e
            Zn = np.where(sw_e > 0, Zn, 0.0)
            Zn -= np.median(Zn[sw_e > 0]) if (sw_e > 0).any() else 0.0
            if np.max(np.abs(Zn - Z)) < tol:
                Z = Zn
                break
            Z = Zn
    return Z, M


def _median_rms(m: np.ndarray, star: np.ndarray, ns: int) -> float:
    n = np.bincount(star, minlength=ns)
    mean = np.bincount(star, weights=m, minlength=ns) / np.maximum(n, 1)
    var = np.bincount(star, weights=(m - mean[star]) ** 2, minlength=ns) / np.maximum(n - 1, 1)
    ok = n >= 2
    return float(np.median(np.sqrt(var[ok]))) if ok.any() else np.nan


def apply_zero_points(sources: pd.DataFrame, zero_points: pd.DataFrame) -> pd.DataFrame:
    """Correct ``psf_flux``/``psf_flux_err`` (and aperture fluxes) by each epoch's offset.

    A source at an epoch with offset Z (mag) gets flux * 10**(0.4 Z).  Epochs
    without a solution (NaN) keep their fluxes.  Returns a new frame with a
    ``zp`` column added.
    """
    _need(sources, ["exposure_id", "band"], "sources")
    key = pd.MultiIndex.from_arrays([zero_points["band"].astype("string"),
                                     zero_points["exposure_id"].astype("int64")])
    zmap = pd.Series(zero_points["zp"].to_numpy(np.float64), index=key)
    idx = pd.MultiIndex.from_arrays([sources["band"].astype("string"),
                                     sources["exposure_id"].astype("int64")])
    z = zmap.reindex(idx).to_numpy(np.float64)
    factor = np.where(np.isfinite(z), 10.0 ** (0.4 * np.nan_to_num(z)), 1.0)
    out = sources.copy()
    for c in out.columns:
        if c.startswith(("psf_flux", "ap_flux")):
            out[c] = out[c].to_numpy(np.float64, na_value=np.nan) * factor
    out["zp"] = z
    return out


def rms_vs_mag(sources: pd.DataFrame, *, min_epochs: int = 3) -> pd.DataFrame:
    """Per matched source and band: mean magnitude, rms of magnitudes about it, n.

    The field's photometric-quality diagnostic; variable sources lie above
    the noise-limited curve.
    """
    _need(sources, ["matched_source_id", "band", "psf_flux", "psf_flux_err"], "sources")
    mag, _ = _mags(sources["psf_flux"].to_numpy(np.float64, na_value=np.nan),
                   sources["psf_flux_err"].to_numpy(np.float64, na_value=np.nan))
    df = pd.DataFrame({"matched_source_id": sources["matched_source_id"].to_numpy(),
                       "band": sources["band"].astype("string").to_numpy(object), "mag": mag})
    df = df[np.isfinite(mag)]
    g = df.groupby(["matched_source_id", "band"])["mag"]
    out = pd.DataFrame({"mean_mag": g.mean(), "rms_mag": g.std(ddof=1), "n": g.size()})
    out = out[out.n >= min_epochs].reset_index()
    return out


def rms_figure(table: pd.DataFrame):
    """The rms-versus-magnitude figure (a matplotlib Figure): per band the sources (log rms), the
    fitted noise curve ``rms_model`` where the table has it (:func:`~archive.catalog.matched_ingest.rms_with_model`)
    and the sources it reports as ``outlier`` ringed in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for band, t in table.groupby("band"):
        pts = ax.scatter(t["mean_mag"], t["rms_mag"], s=4, label=str(band))
        if "rms_model" in t and np.isfinite(t["rms_model"].to_numpy(float)).any():
            m = t[np.isfinite(t["rms_model"].to_numpy(float))].sort_values("mean_mag")
            ax.plot(m["mean_mag"], m["rms_model"], "-", color=pts.get_facecolor()[0], lw=1.2,
                    label=f"{band}: rms model", gid="rms_model")
    if "outlier" in table:
        out = table[table["outlier"].astype(bool)]
        if len(out):
            ax.scatter(out["mean_mag"], out["rms_mag"], s=40, facecolors="none", edgecolors="red", lw=1.0,
                       label=f"outliers ({len(out)})", gid="outliers")
    ax.set_yscale("log")
    ax.set_xlabel("mean magnitude (AB)")
    ax.set_ylabel("rms (mag)")
    ax.legend(title="band", fontsize="small")
    fig.tight_layout()
    return fig


def plot_rms_vs_mag(table: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Draw :func:`rms_figure` into an image file."""
    import matplotlib.pyplot as plt

    fig = rms_figure(table)
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def epoch_matrix(sources: pd.DataFrame, column: str = "psf_flux") -> pd.DataFrame:
    """Epochs x matched sources matrix of ``column`` (NaN where not seen).

    Rows are indexed by ``exposure_id`` (sorted by ``mjd`` when present), columns
    by ``matched_source_id``.  A source detected twice on one epoch raises.
    """
    _need(sources, ["matched_source_id", "exposure_id", column], "sources")
    df = sources[["exposure_id", "matched_source_id", column]
                 + (["mjd"] if "mjd" in sources.columns else [])]
    if df.duplicated(["exposure_id", "matched_source_id"]).any():
        raise ValidationError("epoch_matrix: a matched source has two rows on one exposure")
    mat = df.pivot(index="exposure_id", columns="matched_source_id", values=column)
    if "mjd" in df.columns:
        order = df.groupby("exposure_id")["mjd"].min().reindex(mat.index).sort_values()
        mat = mat.loc[order.index]
    mat.columns = mat.columns.astype("int64")
    return mat.astype(np.float64)


def export_matrix(matrix: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write an :func:`epoch_matrix` to ``.parquet`` or ``.h5``/``.hdf5``.

    Parquet: one column per matched source (named by its id) plus
    ``exposure_id``.  HDF5: datasets ``values`` (epochs x sources, float64),
    ``exposure_id`` and ``matched_source_id``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        out = matrix.copy()
        out.columns = [str(c) for c in out.columns]
        out.index.name = "exposure_id"
        out.reset_index().to_parquet(path, index=False)
    elif suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "w") as f:
            f.create_dataset("values", data=matrix.to_numpy(np.float64), compression="gzip")
            f.create_dataset("exposure_id", data=matrix.index.to_numpy(np.int64))
            f.create_dataset("matched_source_id", data=matrix.columns.to_numpy(np.int64))
    else:
        raise ValidationError(f"export_matrix: {path} must end in .parquet, .h5 or .hdf5")
    return path


def summarize(sources: pd.DataFrame) -> pd.DataFrame:
    """``matched_source`` rows (every schema column) from all detections of each source.

    Positions are weighted means of unit vectors (weights as DIAObjects);
    per band: n, weighted mean flux, its error, sigma (ddof=1), chi^2 about the
    mean, and the rms of magnitudes.  Pass fluxes after :func:`apply_zero_points`.
    """
    _need(sources, ["matched_source_id", "ra", "dec", "mjd", "band", "exposure_id"], "sources")
    table = load_schema()["matched_source"]
    ids = sources["matched_source_id"].to_numpy(np.int64)
    uid, inv = np.unique(ids, return_inverse=True)
    n = uid.size
    out: dict[str, np.ndarray] = {c.name: np.full(n, np.nan) for c in table.columns}
    out["matched_source_id"] = uid
    ra = sources["ra"].to_numpy(np.float64)
    dec = sources["dec"].to_numpy(np.float64)
    w = position_weights(sources)
    wv = w[:, None] * radec_to_vec(ra, dec)
    v = np.stack([np.bincount(inv, weights=wv[:, k], minlength=n) for k in range(3)], axis=-1)
    sw = np.bincount(inv, weights=w, minlength=n)
    out["ra"], out["dec"] = vec_to_radec(v)
    out["dec_err"] = np.sqrt(1.0 / sw)
    out["ra_err"] = out["dec_err"]  # on the sky (of ra*cos(dec)), isotropic
    out["healpix29"] = radec_to_healpix29(out["ra"], out["dec"]) if n else np.empty(0, np.int64)
    ep = pd.DataFrame({"k": inv, "e": sources["exposure_id"].to_numpy(np.int64)})
    out["n_epochs"] = ep.groupby("k")["e"].nunique().reindex(range(n)).to_numpy()
    mjd = sources["mjd"].to_numpy(np.float64)
    first = np.full(n, np.inf)
    last = np.full(n, -np.inf)
    np.minimum.at(first, inv, mjd)
    np.maximum.at(last, inv, mjd)
    out["first_mjd"], out["last_mjd"] = first, last
    band = sources["band"].astype("string").to_numpy(object)
    flux = sources["psf_flux"].to_numpy(np.float64, na_value=np.nan) if "psf_flux" in \
        sources.columns else np.full(len(sources), np.nan)
    err = sources["psf_flux_err"].to_numpy(np.float64, na_value=np.nan) if "psf_flux_err" in \
        sources.columns else np.full(len(sources), np.nan)
    mag, _ = _mags(flux, err)
    for b in load_schema().bands:
        inb = band == b
        out[f"{b}_n"] = np.bincount(inv[inb], minlength=n)
        ok = inb & np.isfinite(flux) & np.isfinite(err) & (err > 0)
        if not ok.any():
            continue
        k, f, wt = inv[ok], flux[ok], 1.0 / err[ok] ** 2
        swf = np.bincount(k, weights=wt, minlength=n)
        cnt = np.bincount(k, minlength=n)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.bincount(k, weights=wt * f, minlength=n) / swf
            out[f"{b}_flux_mean"] = mean
            out[f"{b}_flux_mean_err"] = 1.0 / np.sqrt(swf)
            out[f"{b}_flux_chi2"] = np.bincount(k, weights=wt * (f - mean[k]) ** 2,
                                                minlength=n)
            fm = np.bincount(k, weights=f, minlength=n) / cnt
            out[f"{b}_flux_sigma"] = np.where(cnt >= 2, np.sqrt(
                np.bincount(k, weights=(f - fm[k]) ** 2, minlength=n) / (cnt - 1)), np.nan)
            mm = np.isfinite(mag) & ok
            km, mv = inv[mm], mag[mm]
            cm = np.bincount(km, minlength=n)
            mmean = np.bincount(km, weights=mv, minlength=n) / cm
            out[f"{b}_mag_rms"] = np.where(cm >= 2, np.sqrt(
                np.bincount(km, weights=(mv - mmean[km]) ** 2, minlength=n) / (cm - 1)), np.nan)
    types = {"int64": np.int64, "int32": np.int32, "float32": np.float32, "float64": np.float64}
    return pd.DataFrame({c.name: np.asarray(out[c.name]).astype(types[c.type])
                         for c in table.columns})
