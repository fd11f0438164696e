"""End to end on the survey simulator: raw -> calexp + calibrated sources, against the truth."""

import numpy as np
import pandas as pd
import pytest
from scipy.spatial import cKDTree

from archive.image.raw import read_raw
from archive.process import flags as F_
from archive.process import single_frame
from archive.process.masters import make_master_bias, make_master_dark, make_master_flat
from archive.sim import SimConfig, load_manifest, simulate_survey, wcs_from_text


@pytest.fixture(scope="module")
def processed(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    simulate_survey(d, SimConfig(seed=7, n_epochs=1, size=640, star_density=100, cosmic_ray_rate=60,
                                 n_bias=3, n_dark=3, n_flat=3))
    man = load_manifest(d)
    bias = make_master_bias([read_raw(d / c["path"]) for c in man["calib"]["bias"]])
    dark = make_master_dark([read_raw(d / c["path"]) for c in man["calib"]["dark"]], bias)
    flat = make_master_flat([read_raw(d / c["path"]) for c in man["calib"]["flat"]["r"]], bias, dark)
    refcat = pd.read_parquet(d / "refcat.parquet")
    raw = read_raw(d / man["raws"][0]["path"])
    res = single_frame.run(raw, bias, dark, flat, refcat)
    truth = pd.read_parquet(d / "truth" / "sources.parquet")
    epoch = pd.read_parquet(d / "truth" / "epochs.parquet").iloc[0]
    crs = pd.read_parquet(d / "truth" / "cosmic_rays.parquet")
    defects = pd.read_parquet(d / "truth" / "defects.parquet")
    return res, truth.reset_index(drop=True), epoch, crs, defects, bias, dark, flat


def _truth_snr(truth, epoch):
    from archive.sim import truth_psf

    p = truth_psf(epoch).render_stamps(truth.x.to_numpy(), truth.y.to_numpy(), 31)
    p2 = (p ** 2).sum(axis=(1, 2))
    p3 = (p ** 3).sum(axis=(1, 2))
    g = epoch.gain
    skyv = epoch.sky_e / g ** 2 + (5.0 / g) ** 2
    c = truth.counts.to_numpy()
    return c / np.sqrt(skyv / p2 + c * p3 / (g * p2 ** 2))


def _isolation(truth, radius, frac):
    c = truth.flux_njy.to_numpy()
    iso = np.ones(len(truth), dtype=bool)
    pairs = cKDTree(np.c_[truth.x, truth.y]).query_pairs(radius, output_type="ndarray")
    for a, b in pairs:
        if c[b] > frac * c[a]:
            iso[a] = False
        if c[a] > frac * c[b]:
            iso[b] = False
    return iso


def test_not_rejected_and_calibrated(processed):
    res = processed[0]
    assert not res.rejected, res.reason
    assert res.calexp.psf is not None and res.calexp.photo_calib is not None
    assert res.psf.n_stars >= 10
    assert res.quality.ok


def test_detection_completeness_and_purity(processed):
    res, truth, epoch = processed[:3]
    s = res.sources
    snr = _truth_snr(truth, epoch)
    fw = epoch.psf_fwhm
    stars = truth.kind.isin(["star", "variable"]).to_numpy() & ~truth.saturated.to_numpy()
    # resolvable: no object of comparable brightness (>30%) within 1.5 FWHM
    resolvable = _isolation(truth, 1.5 * fw, 0.3)
    d, _ = cKDTree(np.c_[s.x, s.y]).query(np.c_[truth.x, truth.y])
    sel = stars & resolvable & (snr > 10)
    assert sel.sum() > 100
    assert (d[sel] < 1.5).mean() >= 0.95
    # purity: detections above S/N 10 (not running off the edge) that are real objects; an
    # unresolved pair is detected between its two stars, hence a match radius of half a FWHM
    d2, _ = cKDTree(np.c_[truth.x, truth.y]).query(np.c_[s.x, s.y])
    det = (s.snr.to_numpy() > 10) & ((s["flags"].to_numpy() & int(F_.FLAG_STAMP_EDGE)) == 0)
    assert det.sum() > 100
    assert (d2[det] < max(1.5, 0.5 * fw)).mean() >= 0.99


def test_centroids_astrometry_and_photometry(processed):
    res, truth, epoch = processed[:3]
    s = res.sources
    snr = _truth_snr(truth, epoch)
    stars = truth.kind.isin(["star"]).to_numpy() & ~truth.saturated.to_numpy()
    iso = _isolation(truth, 4 * epoch.psf_fwhm, 0.01)
    d, i = cKDTree(np.c_[s.x, s.y]).query(np.c_[truth.x, truth.y])
    m = (d < 1.0) & stars & iso
    bright = m & (snr > 50)
    assert bright.sum() >= 15
    ss, tt = s.iloc[i[bright]], truth[bright]
    dx = ss.x.to_numpy() - tt.x.to_numpy()
    dy = ss.y.to_numpy() - tt.y.to_numpy()
    assert np.sqrt(np.mean(dx ** 2 + dy ** 2) / 2) < 0.05
    # the fitted WCS puts the true sky positions on the true pixels (the header WCS was off by
    # pixels) wherever reference stars constrain it (inside the box of the matched stars)
    xs, ys = res.calexp.wcs.all_world2pix(truth.ra, truth.dec, 0)
    mt = s.loc[res.astrometry.matches.src[res.astrometry.matches.used]]
    inbox = ((truth.x > mt.x.min()) & (truth.x < mt.x.max()) & (truth.y > mt.y.min()) & (truth.y < mt.y.max())).to_numpy()
    assert inbox.sum() > 100
    err = np.hypot(xs - truth.x, ys - truth.y)[inbox]
    assert np.sqrt(np.mean(err ** 2) / 2) < 0.05
    xh, yh = wcs_from_text(epoch.wcs_header).all_world2pix(truth.ra, truth.dec, 0)
    assert np.sqrt(np.mean((xh - truth.x) ** 2 + (yh - truth.y) ** 2) / 2) > 1.0
    assert res.astrometry.rms_arcsec < 0.05
    # calibrated PSF fluxes in nJy: bias < 1% at S/N > 50
    r = ss.psf_flux.to_numpy() / tt.flux_njy.to_numpy()
    assert abs(np.median(r) - 1) < 0.01
    # the zero point refers to 12 px aperture-corrected counts: it differs from the true
    # total-count zero point by the Moffat wings outside 12 px (~1%); the fluxes above are
    # calibrated against the reference catalog and carry no such offset
    assert res.photocal.zero_point == pytest.approx(epoch.zero_point, abs=0.02)
    # errors: pulls of isolated stars whose pixels within 3 px hold no cosmic ray (a star on
    # an incompletely masked CR is 15 sigma off here). At S/N > 50 the PSF model used to
    # dominate (pull std 3.8 on this field); the errors now include the model's own flux
    # error and the pulls equal those measured with the simulator's true PSF star by star
    # (std 1.23 with either on this field; 0.96-1.09 on seeds 8, 9, 11), so what is left
    # above 1 is not the PSF model. The widths of ~30-40 pulls scatter by +-0.15.
    no_cr = (s["flags"].to_numpy() & F_.plane_bits(res.calexp.mask_planes, "CR", "INTRP")) == 0

    def pulls(lo, hi):
        sel = m & (snr > lo) & (snr < hi) & no_cr[i]
        sp, tp = s.iloc[i[sel]], truth[sel]
        return (sp.psf_flux.to_numpy() - tp.flux_njy.to_numpy() * np.median(r)) / sp.psf_flux_err.to_numpy()
    bright_pull = pulls(50, np.inf)
    assert bright_pull.size >= 15
    assert 0.8 < bright_pull.std() < 1.3
    # 10 < S/N < 50: robust (MAD) width, a few stars sit on galaxy wings (1.19 with the true PSF)
    faint_pull = pulls(10, 50)
    assert faint_pull.size > 30
    assert 0.8 < 1.4826 * np.median(np.abs(faint_pull - np.median(faint_pull))) < 1.3
    # ra/dec/healpix present
    assert s.healpix29.dtype == np.int64 and s.ra.notna().all()


def test_cosmic_rays_masked_not_catalogued(processed):
    res, truth, epoch, crs = processed[:4]
    crm = res.calexp.mask_of("CR")
    assert len(crs) >= 10
    masked = []
    for cr in crs.itertuples():
        n = int(max(abs(cr.x1 - cr.x0), abs(cr.y1 - cr.y0))) + 1
        xs = np.round(np.linspace(cr.x0, cr.x1, n)).astype(int)
        ys = np.round(np.linspace(cr.y0, cr.y1, n)).astype(int)
        ok = (xs >= 0) & (xs < crm.shape[1]) & (ys >= 0) & (ys < crm.shape[0])
        masked.append(crm[ys[ok], xs[ok]].mean() > 0.5 if ok.any() else True)
    assert np.mean(masked) >= 0.95
    s = res.sources
    ends = np.r_[np.c_[crs.x0, crs.y0], np.c_[crs.x1, crs.y1]]
    dcr, _ = cKDTree(ends).query(np.c_[s.x, s.y])
    dtr, _ = cKDTree(np.c_[truth.x, truth.y]).query(np.c_[s.x, s.y])
    assert ((dcr < 2) & (dtr > 2)).sum() == 0


def test_masters_flag_simulated_defects(processed):
    defects, bias, dark, flat = processed[4:8]
    hot = defects[defects.kind == "hot_pixel"]
    strong = hot[hot.value > 10 * np.median(dark.image) * 1.6 + 5]
    assert dark.mask_of("BAD")[strong.y, strong.x].mean() > 0.9
    cols = defects[defects.kind == "bad_column"]
    for c in cols.itertuples():
        assert flat.mask_of("BAD")[:, int(c.x)].mean() > 0.9
