"""Forced PSF photometry at given positions on an Exposure (calexp, difference or template).

:func:`forced_photometry` measures the PSF flux of a point source at each of many
given pixel positions (0-based, pixel centres at integers; see :mod:`archive.image.psf`)
using the exposure's own PSF, variance plane and mask; :func:`forced_at_sky` does the
same for sky positions through the exposure's WCS.  Pure: arrays and an Exposure in, a
DataFrame out (one row per position, in the input order); nothing is read from or
written to the store.

The fit
-------
Each position is fitted on its own ``S x S`` stamp (``S = 2 ceil(fit_halfsize_fwhm FWHM) + 1``,
at least 7) centred on the pixel holding it.  With ``P`` the PSF stamp of unit total flux
at the position (:meth:`PSF.stamps`: the fraction of the flux each pixel collects),
``I`` the image, ``V`` the variance plane and the sum over the stamp's usable pixels
(finite image and variance, ``V > 0``, none of ``bad_planes`` set, on the image)::

    flux     = sum(P I / V) / sum(P^2 / V)
    flux_err = 1 / sqrt(sum(P^2 / V))

the weighted least-squares amplitude of the PSF, linear and unbiased whatever the
stamp size (``P`` is not renormalised: the flux is the source's total flux).  This is
the case of an isolated position without background; in general the fit is the linear
least-squares solution for the columns

* ``P`` of the position itself,
* ``P_k`` of every other given position within ``blend_radius_fwhm`` FWHM (its
  neighbours, up to ``max_neighbours``, nearest first), rendered on the same stamp,
* a constant local background when ``fit_background`` (off by default: a difference
  image has no background left, and a calexp's was subtracted; turn it on for images
  whose background residuals matter at the flux levels measured).  A constant would
  absorb the light of a neighbour on the stamp's edge, which the PSF weighting of a fit
  without background ignores, so with it every given position within the stamp's
  half-size plus ``BACKGROUND_REACH_FWHM`` (1.5) FWHM is a neighbour of the fit (light
  of sources not in the list still biases it: use it on images where the list holds
  every source that matters),
* when recentring, ``dP/dx`` and ``dP/dy`` of the position (see below),

solved for all positions at once with batched normal equations ``N theta = A^T W I``,
grouped by the number of columns (no Python loop over positions; positions are processed
in chunks of ``chunk_pixels`` float64 elements per work array).  ``psf_flux`` is the
position's own amplitude and ``psf_flux_err`` the square root of its diagonal element of
``N^-1``: the error marginalised over the neighbours' fluxes and the background.  For an
isolated position without background these are exactly the two formulas above.

Neighbours (blends)
-------------------
Positions closer than ``blend_radius_fwhm`` (default 2.5) FWHM are fitted
simultaneously, so the light of one is not counted again in the other's flux: each
position's fit models its neighbours' PSFs as nuisance amplitudes on its stamp, and
reports its own amplitude.  For an isolated pair this is the joint two-source fit (each
row's flux is the joint solution on that row's stamp); for groups of any size each
position is fitted with every neighbour within the radius (at most ``max_neighbours``,
the nearest; more set CROWDED).  Neighbours of neighbours farther than the radius are
not modelled here: a fit takes up the fraction ``rho(d)`` of the flux of a source at
distance ``d`` left on its stamp (``exp(-d^2 / 4 sigma^2)`` for a Gaussian of the
pixel-integrated sigma, ~2e-4 at 2.5 FWHM; more in a Moffat's wings), which the bright
models below remove where it matters.  Positions closer than ``min_separation_fwhm``
(default 0.2) FWHM cannot be told apart (the joint system is singular): they are not
fitted against each other, each measures the light of both, and both are flagged
BLENDED and UNRESOLVED (of a centre's neighbours that close to each other, only the
nearest enters its fit).  A neighbour whose PSF falls almost entirely on unusable pixels
of the stamp drops out of the fit.  BLENDED is set on every position with another
within the blend radius (the wider set of neighbours of a background fit does not set
it).  Positions off the image take part as neighbours (their light may fall on it) but
are not measured themselves.

Bright positions outside a fit
------------------------------
A bright position farther than the blend radius still leaves light on a faint one's stamp
(a Moffat's wings); fitted alone, the faint one takes up the fraction ``rho(d)`` of it
(the PSF's normalised overlap with itself at distance ``d``).  With ``subtract_bright``
(default on), every position is first fitted alone; the bright ones (S/N >=
``bright_snr``) are drawn with those fluxes on stamps of ``model_halfsize_fwhm`` FWHM and
all positions are fitted, with their neighbours, on the image less that model (a bright
position inside a fit is then fitted for its correction, so nothing is subtracted twice).
The first fluxes of bright blended positions hold their neighbours' light, so the
positions whose fit that error may bias by more than ``neighbour_tolerance`` flux errors
are fitted again with the model redrawn from the joint fluxes.  ``attrs["refit_for_bright"]``
counts those refits.  Light of sources not in the list is not modelled.

Recentring (LAST's rule)
------------------------
``recenter=False`` (default): the positions are fixed.  ``recenter=True`` (for users'
lists of catalogue positions): for each position with ``flux / flux_err >=
recenter_min_snr`` the flux and a shift are fitted with the linearised PSF,
``I ~ F P + a dP/dx + c dP/dy`` (shift ``(a / F, c / F)``); the position moves by the
shift and the fit is repeated there, at most ``max_iterations`` (2) times.  If the total
move from the given position exceeds ``max_shift`` (0.2 px) the given position is kept
and CENTROID is set; otherwise ``moved`` is True and the flux is that of a fixed-position
fit at the final position, with the error of the last fit with the position free (the
larger: the same for an isolated position, larger for a close blend, where a shift trades
flux between the neighbours).  Neighbours stay at their given positions while a position
is recentred, and the recentring fits see the image as it is (no bright models removed);
the final fit of all positions uses every position's final place.  Positions fainter than
``recenter_min_snr`` are not recentred (not moved, not flagged).  The S/N is that of the
joint fit: a list entry within the blend radius of another that sits on the star (a
catalogue duplicate 2 px off, say) gets little of the star's light, is faint, and is left
alone; an entry with no such neighbour is flagged CENTROID however far it is from the star
(the linearised shift of its first iteration is past ``max_shift`` from ~0.25 px up to
several FWHM, as long as the star's light at the position keeps it above
``recenter_min_snr``).

Flags (int64)
-------------
Bits 0-31: the exposure's mask planes OR'd over the pixels within ``core_radius_fwhm``
FWHM of the position (NO_DATA, SAT, BAD, CR, INTRP, EDGE, ... in the exposure's own
layout, ``DataFrame.attrs["mask_planes"]``).  Bits 32 and up
(:data:`archive.process.flags.FORCED_FLAGS`): OFF_IMAGE (position not on the image or not
finite: no fit; PSF_FLUX set too), STAMP_EDGE (the stamp runs off the image: the fit
uses the part on it), PSF_FLUX (no usable pixel for the position's PSF: fluxes NaN),
MASKED_FRACTION (``masked_fraction`` above ``max_masked_fraction``), BLENDED, CROWDED,
UNRESOLVED (another position closer than ``min_separation_fwhm``), CENTROID (recentring
refused).  ``masked_fraction`` is the fraction of the PSF's flux on the stamp that falls
on unusable pixels (masked, off the image, no variance).

Columns
-------
``x, y`` (final position, px), ``psf_flux, psf_flux_err`` (nJy when the exposure has a
photometric calibration and ``calibrate`` is on, else image units:
``DataFrame.attrs["flux_unit"]``), ``psf_chi2`` (chi^2 of the position's fit over its
stamp's usable pixels; ``psf_chi2 / psf_ndof`` is the reduced chi^2), ``psf_ndof``
(usable pixels minus fitted amplitudes), ``masked_fraction``, ``flags``, ``moved``.
:func:`forced_at_sky` adds ``ra, dec`` (deg; of the final position).

The variance plane is used as it is: on a calexp it holds the sources' own photon
noise as well, and the weights ``1 / V`` then downweight a bright source's core (no
bias as long as the plane does not depend on the noise of the pixel it describes).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from archive.errors import ValidationError
from archive.image.exposure import Exposure
from archive.image.psf import PSF
from archive.process import flags as F_
from archive.process.stamps import PaddedFrame, chunks

#: key of ``DataFrame.attrs`` with the mask layout of ``flags`` (as in archive.process.measure)
MASK_PLANES_ATTR = "mask_planes"
#: key of ``DataFrame.attrs`` with the unit of ``psf_flux`` (``"nJy"`` or ``"count"``)
FLUX_UNIT_ATTR = "flux_unit"

#: with ``fit_background``, positions within the stamp's half-size plus this many FWHM are fitted
#: with each position (their light on the stamp is modelled, not left to the background)
BACKGROUND_REACH_FWHM = 1.5

COLUMNS = ("x", "y", "psf_flux", "psf_flux_err", "psf_chi2", "psf_ndof", "masked_fraction", "flags", "moved")


@dataclass(frozen=True)
class ForcedConfig:
    """Configuration of :func:`forced_photometry` (see the module docstring).

    fit_halfsize_fwhm: half-size of the fit stamp in FWHM (the stamp is at least 7 px).
    stamp_size: explicit odd stamp side (px) instead of the one from ``fit_halfsize_fwhm``.
    fit_background: fit a constant local background on each stamp jointly with the fluxes.
    blend_radius_fwhm: positions closer than this (FWHM) are fitted simultaneously.
    min_separation_fwhm: positions closer than this (FWHM) are not separated (BLENDED, UNRESOLVED).
    max_neighbours: at most this many neighbours (the nearest) in one fit; more set CROWDED.
    recenter: recentre by LAST's rule (at most ``max_iterations`` moves, ``max_shift`` px in all).
    max_shift: largest total move (px) recentring may make; beyond it the position is kept, CENTROID set.
    max_iterations: recentring iterations.
    recenter_min_snr: positions below this S/N are not recentred.
    subtract_bright: fit on the image less the models of the bright positions (their light outside
        a fit is removed from it; see the module docstring).
    bright_snr: positions whose first (single-position) fit has at least this S/N are bright.
    model_halfsize_fwhm: half-size (FWHM) of the bright positions' model stamps.
    neighbour_tolerance: largest bias (flux errors) left by the error of a bright model.
    bright_iterations: 1 + rounds of refits with the bright models redrawn from the joint fluxes.
    bad_planes: mask planes whose pixels get zero weight.
    core_radius_fwhm: mask bits within this radius (FWHM, at least 1 px) are OR'd into ``flags``.
    max_masked_fraction: MASKED_FRACTION is set above this fraction of the PSF's flux on unusable pixels.
    calibrate: give fluxes in nJy when the exposure has a photometric calibration.
    chunk_pixels: float64 elements per work array (bounds memory: ~ 8 x this many bytes per array).
    """

    fit_halfsize_fwhm: float = field(default=2.0, metadata={"min": 0.5, "max": 20.0})
    stamp_size: int | None = None
    fit_background: bool = False
    blend_radius_fwhm: float = field(default=2.5, metadata={"min": 0.0, "max": 10.0})
    min_separation_fwhm: float = field(default=0.2, metadata={"min": 0.0, "max": 2.0})
    max_neighbours: int = field(default=8, metadata={"min": 0, "max": 64})
    recenter: bool = False
    max_shift: float = field(default=0.2, metadata={"min": 0.0, "max": 10.0})
    max_iterations: int = field(default=2, metadata={"min": 1, "max": 10})
    recenter_min_snr: float = field(default=5.0, metadata={"min": 0.0})
    subtract_bright: bool = True
    bright_snr: float = field(default=20.0, metadata={"min": 0.0})
    model_halfsize_fwhm: float = field(default=5.0, metadata={"min": 1.0, "max": 50.0})
    neighbour_tolerance: float = field(default=0.02, metadata={"min": 0.0})
    bright_iterations: int = field(default=2, metadata={"min": 1, "max": 10})
    bad_planes: tuple[str, ...] = ("BAD", "SAT", "CR", "NO_DATA")
    core_radius_fwhm: float = field(default=1.0, metadata={"min": 0.0, "max": 10.0})
    max_masked_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})
    calibrate: bool = True
    chunk_pixels: int = field(default=2_000_000, metadata={"min": 10_000})

    def validate(self) -> None:
        """Raise ValueError naming the first setting out of range."""
        for f in self.__dataclass_fields__.values():
            v = getattr(self, f.name)
            meta = f.metadata
            if isinstance(v, float) and not math.isfinite(v) and f.name != "recenter_min_snr":
                raise ValueError(f"ForcedConfig.{f.name} must be finite, got {v!r}")
            if "min" in meta and v < meta["min"]:
                raise ValueError(f"ForcedConfig.{f.name}: {v!r} is below its minimum {meta['min']!r}")
            if "max" in meta and v > meta["max"]:
                raise ValueError(f"ForcedConfig.{f.name}: {v!r} is above its maximum {meta['max']!r}")
        if self.stamp_size is not None and (int(self.stamp_size) != self.stamp_size or self.stamp_size < 3
                                            or self.stamp_size % 2 == 0):
            raise ValueError(f"ForcedConfig.stamp_size must be an odd integer >= 3, got {self.stamp_size!r}")
        if self.min_separation_fwhm > self.blend_radius_fwhm and self.blend_radius_fwhm > 0:
            raise ValueError("ForcedConfig.min_separation_fwhm must not exceed blend_radius_fwhm")

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- frame
class _Frame:
    """Padded flat planes of the exposure: data (0 where unusable), weight ``1 / V`` (0 where
    unusable, off the image included) and the mask."""

    def __init__(self, exposure: Exposure, bad_planes: tuple[str, ...], pad: int):
        self.fr = PaddedFrame(exposure.shape, pad)
        img = exposure.image
        var = exposure.variance
        with np.errstate(invalid="ignore"):
            usable = np.isfinite(img) & np.isfinite(var) & (var > 0)
        bad = F_.plane_bits(exposure.mask_planes, *bad_planes)
        if bad:
            usable &= (exposure.mask & bad) == 0
        self.w = self.fr.plane(None, np.float32)
        np.divide(np.float32(1.0), var, out=self.fr.crop(self.w), where=usable)
        self.d = self.fr.plane(None, np.float32)
        np.copyto(self.fr.crop(self.d), img, where=usable)
        self.m = self.fr.plane(exposure.mask, np.int32, 0)


# --------------------------------------------------------------------------- the fit
def _fit(frame: _Frame, psf: PSF, xs: np.ndarray, ys: np.ndarray, centre: np.ndarray, nbr: np.ndarray,
         size: int, cfg: ForcedConfig, gradient: bool, data: np.ndarray | None = None) -> dict:
    """Linear PSF fits of the positions ``centre`` (indices into xs, ys), each on its own stamp
    with the neighbours ``nbr`` (m, K) (indices, -1 = none; valid entries first).

    Returns per centre: ``flux``, ``var`` (its marginal variance), ``chi2``, ``ndof``,
    ``mfrac`` (PSF flux fraction on unusable pixels), ``ok`` (a usable fit) and, with
    ``gradient``, ``dx``, ``dy`` (the linearised shift).  ``data``: the flat padded plane
    fitted (default the frame's image).
    """
    plane = frame.d if data is None else data
    m = centre.size
    L = size * size
    out = {k: np.full(m, np.nan) for k in ("flux", "var", "chi2", "mfrac", "dx", "dy")}
    out["ndof"] = np.zeros(m, dtype=np.int64)
    out["ok"] = np.zeros(m, dtype=bool)
    nk = (nbr >= 0).sum(axis=1) if nbr.size else np.zeros(m, dtype=np.int64)
    nb_extra = int(cfg.fit_background) + 2 * int(gradient)
    for k in np.unique(nk):
        sel_all = np.flatnonzero(nk == k)
        p = 1 + k + nb_extra
        step = max(1, cfg.chunk_pixels // (p * L))
        for sl in chunks(sel_all.size, step):
            sel = sel_all[sl]
            c = centre[sel]
            n = c.size
            xcc = np.floor(xs[c] + 0.5).astype(np.int64)
            ycc = np.floor(ys[c] + 0.5).astype(np.int64)
            idx = frame.fr.index(xcc, ycc, size).reshape(n, L)
            D = plane.take(idx).astype(np.float64)
            W = frame.w.take(idx).astype(np.float64)
            members = np.concatenate([c[:, None], nbr[sel, :k]], axis=1) if k else c[:, None]
            cols = []
            if gradient:
                P0, Gx, Gy = psf.stamps_with_gradient(xs[c], ys[c], size, xcc, ycc)
                cols.append(P0.reshape(n, 1, L))
            else:
                cols.append(psf.stamps(xs[c], ys[c], size, xcc, ycc).reshape(n, 1, L))
            if k:
                mem = members[:, 1:].ravel()
                Pn = psf.stamps(xs[mem], ys[mem], size, np.repeat(xcc, k), np.repeat(ycc, k))
                cols.append(Pn.reshape(n, k, L))
            if cfg.fit_background:
                cols.append(np.ones((n, 1, L)))
            if gradient:
                cols += [Gx.reshape(n, 1, L), Gy.reshape(n, 1, L)]
            A = np.concatenate([np.asarray(a, dtype=np.float64) for a in cols], axis=1)  # (n, p, L)
            WA = A * W[:, None, :]
            Pc = A[:, 0, :]
            usable = W > 0
            ptot = Pc.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                mfrac = np.where(ptot > 0, (Pc * ~usable).sum(axis=1) / ptot, 1.0)
            nuse = usable.sum(axis=1)
            if p == 1:
                N00 = np.einsum("nl,nl->n", WA[:, 0], Pc)
                r0 = np.einsum("nl,nl->n", WA[:, 0], D)
                ok = N00 > 0
                with np.errstate(invalid="ignore", divide="ignore"):
                    flux = np.where(ok, r0 / N00, np.nan)
                    var = np.where(ok, 1.0 / N00, np.nan)
                theta = flux[:, None]
                n_eff = np.ones(n, dtype=np.int64)
            else:
                N = np.einsum("npl,nql->npq", WA, A, optimize=True)
                r = np.einsum("npl,nl->np", WA, D, optimize=True)
                diag = np.einsum("npp->np", N).copy()
                ok = diag[:, 0] > 0
                # columns with (almost) no weight on the usable pixels drop out of the fit
                scale = np.maximum(np.abs(diag), 1e-300)
                dead = diag <= 1e-8 * np.maximum(diag[:, :1], 1e-300)
                dead[:, 0] = ~ok
                N[dead, :] = 0.0
                N.transpose(0, 2, 1)[dead, :] = 0.0
                N[np.nonzero(dead)[0], np.nonzero(dead)[1], np.nonzero(dead)[1]] = 1.0
                r[dead] = 0.0
                # equilibrate (columns of very different scale: PSF, background, gradients)
                s = 1.0 / np.sqrt(np.where(dead, 1.0, scale))
                Ns = N * s[:, :, None] * s[:, None, :]
                rhs = np.zeros((n, p, 2))
                rhs[:, :, 0] = r * s
                rhs[:, 0, 1] = 1.0 * s[:, 0]
                X = _solve(Ns, rhs)
                theta = X[:, :, 0] * s
                var = X[:, 0, 1] * s[:, 0]
                theta[dead] = 0.0
                flux = np.where(ok, theta[:, 0], np.nan)
                var = np.where(ok & (var > 0), var, np.nan)
                ok &= np.isfinite(flux) & np.isfinite(var)
                n_eff = (~dead).sum(axis=1)
            R = D - np.einsum("np,npl->nl", theta, A)
            chi2 = np.einsum("nl,nl->n", W * R, R)
            out["flux"][sel] = flux
            out["var"][sel] = var
            out["chi2"][sel] = np.where(ok, chi2, np.nan)
            out["ndof"][sel] = np.where(ok, nuse - n_eff, 0)
            out["mfrac"][sel] = mfrac
            out["ok"][sel] = ok
            if gradient:
                with np.errstate(invalid="ignore", divide="ignore"):
                    out["dx"][sel] = np.where(ok, theta[:, p - 2] / theta[:, 0], np.nan)
                    out["dy"][sel] = np.where(ok, theta[:, p - 1] / theta[:, 0], np.nan)
    return out


def _overlap_profile(psf: PSF, x: float, y: float, size: int) -> tuple[np.ndarray, np.ndarray]:
    """``rho(d)``: the largest normalised overlap ``sum(P(r) P(r - d)) / sum(P^2)`` of the PSF with
    itself shifted by ``d`` px or more in any direction (the flux fraction of a source at
    distance ``d`` that a PSF fit of another takes up); sampled at integer ``d``."""
    from scipy.signal import fftconvolve

    k = psf.kernel(x, y, size)
    ac = fftconvolve(k, k[::-1, ::-1], mode="full") / float((k * k).sum())
    c = size - 1
    g = np.arange(ac.shape[0]) - c
    r = np.floor(np.hypot(g[:, None], g[None, :])).astype(np.int64).ravel()
    prof = np.zeros(r.max() + 2)
    np.maximum.at(prof, r, ac.ravel())
    prof = np.maximum.accumulate(prof[::-1])[::-1]  # the envelope: largest at this distance or beyond
    return np.arange(prof.size, dtype=float), prof


class _BrightModel:
    """The light of the bright positions, drawn on the frame, and which fits it may bias.

    ``bright`` (indices into the centres) are drawn with fluxes ``flux`` on stamps of
    half-size ``model_half``; ``pairs`` are the (centre, bright) pairs within reach where the
    bright position is not in the centre's own fit, with ``rho`` the fraction of the bright
    position's flux a fit of the centre would take up (:func:`_overlap_profile`).
    """

    def __init__(self, frame: _Frame, psf: PSF, xs, ys, centres, nbr, bright, size: int, model_half: int,
                 ref: tuple[float, float], chunk_pixels: int):
        self.frame, self.psf, self.xs, self.ys = frame, psf, xs, ys
        self.bright = bright
        self.bj = centres[bright]
        self.model_half = model_half
        self.chunk_pixels = chunk_pixels
        m = centres.size
        nb = self.bj.size
        reach = (model_half + size // 2) * math.sqrt(2.0) + 1.0
        tc = cKDTree(np.column_stack([xs[centres], ys[centres]]))
        tb = cKDTree(np.column_stack([xs[self.bj], ys[self.bj]]))
        pairs = tc.sparse_distance_matrix(tb, reach, output_type="ndarray")  # zero distances are left out
        i, b, d = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
        brow = np.full(xs.size, -1, dtype=np.int64)
        brow[self.bj] = np.arange(nb)
        out = centres[i] == self.bj[b]
        if nbr.size:
            mb = np.where(nbr >= 0, brow[np.maximum(nbr, 0)], -1)
            rr = np.broadcast_to(np.arange(m)[:, None], mb.shape)
            out |= np.isin(i * nb + b, (rr * nb + mb)[mb >= 0])
        self.i, self.b = i[~out], b[~out]
        dgrid, prof = _overlap_profile(psf, ref[0], ref[1], 2 * model_half + 1)
        self.rho = np.interp(d[~out], dgrid, prof, right=0.0)
        self.m = m

    def bias(self, dflux: np.ndarray) -> np.ndarray:
        """Upper bound of each centre's flux bias from bright-flux errors ``dflux`` (per bright)."""
        return np.bincount(self.i, weights=np.abs(dflux)[self.b] * self.rho, minlength=self.m)

    def residual(self, flux: np.ndarray) -> np.ndarray:
        """Flat padded plane: the frame's data less the bright positions drawn with ``flux``."""
        fr = self.frame.fr
        sm = 2 * self.model_half + 1
        xs, ys, bj = self.xs, self.ys, self.bj
        model = fr.plane(None, np.float32)
        for sl in chunks(bj.size, max(1, self.chunk_pixels // (sm * sm))):
            xc = np.floor(xs[bj[sl]] + 0.5).astype(np.int64)
            yc = np.floor(ys[bj[sl]] + 0.5).astype(np.int64)
            st = self.psf.stamps(xs[bj[sl]], ys[bj[sl]], sm, xc, yc) * flux[sl, None, None]
            np.add.at(model, fr.index(xc, yc, sm).ravel(), st.astype(np.float32).ravel())
        np.subtract(self.frame.d, model, out=model)
        return model


def _fit_with_bright(frame: _Frame, psf: PSF, xs, ys, centres, nbr, twin, size: int, cfg: ForcedConfig,
                     model_half: int, ref: tuple[float, float]) -> tuple[dict, int]:
    """The fits of all centres with the light of bright positions outside each fit accounted for.

    A first fit of every position alone (its own column only: cheap) finds the bright ones
    (S/N >= ``bright_snr``, no twin closer than the minimum separation: those hold the light
    of both) and their fluxes; they are drawn on stamps of half-size ``model_half`` and every
    position is fitted, with its neighbours, on the image less that model.  The fitted
    amplitudes are then corrections to the drawn fluxes of the bright positions in the fit
    (the fluxes themselves of the others), so each result is its joint fit with the other
    bright positions' light removed.  A bright position's first flux holds its neighbours'
    light; the positions whose predicted bias from the bright positions outside their fit,
    ``sum_j |F_j - F_j(drawn)| rho(d_j)``, exceeds ``neighbour_tolerance`` flux errors are
    refitted with the model redrawn from the joint fluxes (``bright_iterations`` - 1 rounds).
    Returns the results and the number of refits.
    """
    alone = np.full((centres.size, 0), -1, dtype=np.int64)
    first = _fit(frame, psf, xs, ys, centres, alone, size, cfg, gradient=False)
    with np.errstate(invalid="ignore", divide="ignore"):
        snr = first["flux"] / np.sqrt(first["var"])
    bright = np.flatnonzero(first["ok"] & (snr >= cfg.bright_snr) & ~twin)
    if bright.size == 0:
        return _fit(frame, psf, xs, ys, centres, nbr, size, cfg, gradient=False), 0
    bm = _BrightModel(frame, psf, xs, ys, centres, nbr, bright, size, model_half, ref, cfg.chunk_pixels)
    drawn = first["flux"][bright]
    res = _fit(frame, psf, xs, ys, centres, nbr, size, cfg, gradient=False, data=bm.residual(drawn))
    base = np.zeros(centres.size)
    base[bright] = drawn
    res["flux"] += base
    refits = 0
    for _ in range(int(cfg.bright_iterations) - 1):
        now = np.where(res["ok"][bright], res["flux"][bright], drawn)
        with np.errstate(invalid="ignore"):
            redo = np.flatnonzero(res["ok"] & (bm.bias(now - drawn) > cfg.neighbour_tolerance * np.sqrt(res["var"])))
        if redo.size == 0:
            break
        r2 = _fit(frame, psf, xs, ys, centres[redo], nbr[redo], size, cfg, gradient=False, data=bm.residual(now))
        base[bright] = now
        res["flux"][redo] = base[redo] + r2["flux"]
        for key in ("var", "chi2", "ndof", "ok", "mfrac"):
            res[key][redo] = r2[key]
        drawn = now
        refits += int(redo.size)
    return res, refits


def _solve(N: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Batched ``N X = rhs``; a singular system (two columns alike) by its pseudo-inverse, which
    still gives the amplitude and variance of a column outside the degenerate combination."""
    try:
        return np.linalg.solve(N, rhs)
    except np.linalg.LinAlgError:
        X = np.empty(rhs.shape)
        cond = np.linalg.cond(N)
        good = np.isfinite(cond) & (cond < 1e12)
        if good.any():
            X[good] = np.linalg.solve(N[good], rhs[good])
        if (~good).any():
            X[~good] = np.linalg.pinv(N[~good], hermitian=True) @ rhs[~good]
        return X


# --------------------------------------------------------------------------- helpers
def _fwhm(psf: PSF, width: int, height: int) -> float:
    """Largest FWHM (px) of the PSF over a 3 x 3 grid of the image."""
    gx, gy = np.meshgrid(np.linspace(0, width - 1, 3), np.linspace(0, height - 1, 3))
    f = np.asarray(psf.fwhm(gx.ravel(), gy.ravel()), dtype=float)
    f = f[np.isfinite(f) & (f > 0)]
    if f.size == 0:
        raise ValidationError(f"forced photometry: the PSF ({psf!r}) has no finite positive FWHM on the image")
    return float(f.max())


def _neighbours(xs: np.ndarray, ys: np.ndarray, near: np.ndarray, centres: np.ndarray, cfg: ForcedConfig,
                fwhm: float, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Neighbour indices ``(m, K)`` (-1 = none, nearest first) of the ``centres`` among the
    positions ``near`` within ``radius`` px; and per centre: BLENDED (a neighbour within the
    blend radius, or a position closer than the minimum separation), CROWDED (more
    neighbours than ``max_neighbours``), twin (a position closer than the minimum separation)."""
    m = centres.size
    kmax = int(cfg.max_neighbours)
    none = np.full((m, 0), -1, dtype=np.int64)
    if radius <= 0 or near.size < 2 or m == 0:
        return none, np.zeros(m, bool), np.zeros(m, bool), np.zeros(m, bool)
    pts = np.column_stack([xs[near], ys[near]])
    tree = cKDTree(pts)
    # k nearest within the radius: self, up to kmax neighbours, one more to see crowding, and a
    # few more for duplicates closer than the minimum separation
    kq = min(near.size, kmax + 2 + 4)
    d, j = tree.query(np.column_stack([xs[centres], ys[centres]]), k=kq, distance_upper_bound=radius)
    d = np.atleast_2d(d)
    j = np.atleast_2d(j)
    valid = j < near.size
    gi = np.where(valid, near[np.minimum(j, near.size - 1)], -1)
    # every slot filled: there may be more positions within the radius than were returned
    full = valid.all(axis=1) & (kq < near.size)
    gi[gi == centres[:, None]] = -1  # self (found by index: a duplicate may come first)
    valid &= gi >= 0
    sep = cfg.min_separation_fwhm * fwhm
    close = valid & (d < sep)
    keep = valid & ~close
    if sep > 0:
        # of neighbours closer than the minimum separation to each other, only the nearest is fitted
        px = np.where(keep, xs[np.maximum(gi, 0)], np.nan)
        py = np.where(keep, ys[np.maximum(gi, 0)], np.nan)
        for a in range(1, kq):
            with np.errstate(invalid="ignore"):
                twin = (np.hypot(px[:, :a] - px[:, a:a + 1], py[:, :a] - py[:, a:a + 1]) < sep) & keep[:, :a]
            keep[:, a] &= ~twin.any(axis=1)
    blended = (valid & (d < cfg.blend_radius_fwhm * fwhm)).any(axis=1)
    twin = close.any(axis=1)
    # compact the kept neighbours to the left, nearest first (the query orders by distance)
    order = np.argsort(~keep, axis=1, kind="stable")
    gi = np.take_along_axis(np.where(keep, gi, -1), order, axis=1)
    count = keep.sum(axis=1)
    crowded = (count > kmax) | full
    width = int(min(kmax, count.max()))
    return gi[:, :width].astype(np.int64), blended, crowded, twin


def _mask_bits(frame: _Frame, xc: np.ndarray, yc: np.ndarray, radius: float) -> np.ndarray:
    """OR of the mask within ``radius`` px (a disk, at least the centre pixel) of each centre pixel."""
    r = int(math.floor(radius))
    off = np.arange(-r, r + 1)
    disk = (off[:, None] ** 2 + off[None, :] ** 2) <= radius * radius
    flat = (off[:, None] * frame.fr.nxp + off[None, :])[disk]
    base = (yc + frame.fr.pad) * frame.fr.nxp + (xc + frame.fr.pad)
    out = np.zeros(xc.size, dtype=np.int64)
    for sl in chunks(xc.size, 65536):
        vals = frame.m.take(base[sl, None] + flat[None, :])
        out[sl] = np.bitwise_or.reduce(vals, axis=1).astype(np.int64) & 0xFFFFFFFF
    return out


def _empty_frame(n: int = 0) -> dict:
    return {"x": np.full(n, np.nan), "y": np.full(n, np.nan), "psf_flux": np.full(n, np.nan),
            "psf_flux_err": np.full(n, np.nan), "psf_chi2": np.full(n, np.nan),
            "psf_ndof": np.zeros(n, dtype=np.int32), "masked_fraction": np.full(n, np.nan),
            "flags": np.zeros(n, dtype=np.int64), "moved": np.zeros(n, dtype=bool)}


# --------------------------------------------------------------------------- API
def forced_photometry(exposure: Exposure, x, y, config: ForcedConfig | None = None) -> pd.DataFrame:
    """PSF fluxes at pixel positions ``(x, y)`` (0-based) on ``exposure`` (see the module docstring).

    Returns a DataFrame with :data:`COLUMNS`, one row per position in the given order;
    ``attrs``: ``flux_unit``, ``mask_planes``, ``stamp_size``, ``fwhm``.  Positions off
    the image or not finite are flagged OFF_IMAGE (no exception).
    """
    cfg = ForcedConfig() if config is None else config
    if not isinstance(cfg, ForcedConfig):
        raise ValidationError(f"forced_photometry: config must be a ForcedConfig, got {type(cfg).__name__}")
    try:
        cfg.validate()
    except ValueError as exc:
        raise ValidationError(str(exc)) from None
    if not isinstance(exposure, Exposure):
        raise ValidationError(f"forced_photometry: expected an Exposure, got {type(exposure).__name__}")
    psf = exposure.psf
    if psf is None:
        raise ValidationError(f"forced_photometry: {exposure!r} has no PSF")
    xs = np.asarray(x, dtype=np.float64)
    ys = np.asarray(y, dtype=np.float64)
    if xs.shape != ys.shape or xs.ndim > 1:
        raise ValidationError(f"forced_photometry: x and y must be 1-D arrays of one length, got shapes "
                              f"{xs.shape} and {ys.shape}")
    xs = np.atleast_1d(xs).copy()
    ys = np.atleast_1d(ys).copy()
    n = xs.size
    h, w = exposure.shape
    fwhm = _fwhm(psf, w, h)
    if cfg.stamp_size is not None:
        size = int(cfg.stamp_size)
    else:
        size = 2 * max(3, math.ceil(cfg.fit_halfsize_fwhm * fwhm)) + 1
    half = size // 2
    unit = "count"
    scale = 1.0
    if cfg.calibrate and exposure.photo_calib is not None:
        unit = "nJy"
        scale = float(exposure.photo_calib.njy_per_count)
    cols = _empty_frame(n)
    cols["x"][:] = xs
    cols["y"][:] = ys
    attrs = {FLUX_UNIT_ATTR: unit, MASK_PLANES_ATTR: dict(exposure.mask_planes), "stamp_size": size, "fwhm": fwhm}
    finite = np.isfinite(xs) & np.isfinite(ys)
    xc = np.zeros(n, dtype=np.int64)
    yc = np.zeros(n, dtype=np.int64)
    with np.errstate(invalid="ignore"):
        big = finite & ((np.abs(xs) > 1e9) | (np.abs(ys) > 1e9))
    finite &= ~big
    xc[finite] = np.floor(xs[finite] + 0.5).astype(np.int64)
    yc[finite] = np.floor(ys[finite] + 0.5).astype(np.int64)
    on = finite & (xc >= 0) & (xc < w) & (yc >= 0) & (yc < h)
    flags = cols["flags"]
    flags[~on] |= F_.FLAG_OFF_IMAGE | F_.FLAG_PSF_FLUX
    centres = np.flatnonzero(on)
    if centres.size == 0:
        df = pd.DataFrame(cols, columns=list(COLUMNS))
        df.attrs.update(attrs)
        return df
    # positions whose light can reach the image take part as neighbours
    radius = cfg.blend_radius_fwhm * fwhm
    if cfg.fit_background:  # a constant background would soak up light of unmodelled sources on the stamp
        radius = max(radius, half + BACKGROUND_REACH_FWHM * fwhm)
    reach = radius + half + 1
    near = np.flatnonzero(finite & (xs > -reach) & (xs < w - 1 + reach) & (ys > -reach) & (ys < h - 1 + reach))
    nbr, blended, crowded, twin = _neighbours(xs, ys, near, centres, cfg, fwhm, radius)
    model_half = max(math.ceil(cfg.model_halfsize_fwhm * fwhm), half + 1)
    frame = _Frame(exposure, tuple(cfg.bad_planes), pad=max(half, model_half if cfg.subtract_bright else 0) + 2)

    # recentring (LAST's rule): at most max_iterations moves, max_shift px in all
    fx = xs.copy()
    fy = ys.copy()
    refused = np.zeros(n, dtype=bool)
    pos_var = np.full(n, np.nan)  # flux variance of the last fit with the position free
    moved = np.zeros(n, dtype=bool)
    if cfg.recenter:
        active = centres.copy()
        cx = xs.copy()
        cy = ys.copy()
        rows = np.arange(centres.size)
        for _ in range(int(cfg.max_iterations)):
            if active.size == 0:
                break
            # neighbours at their given positions; the centre at its current one
            px = xs.copy()
            py = ys.copy()
            px[active] = cx[active]
            py[active] = cy[active]
            res = _fit(frame, psf, px, py, active, nbr[rows], size, cfg, gradient=True)
            with np.errstate(invalid="ignore", divide="ignore"):
                snr = res["flux"] / np.sqrt(res["var"])
            go = res["ok"] & (snr >= cfg.recenter_min_snr) & np.isfinite(res["dx"]) & np.isfinite(res["dy"])
            a = active[go]
            pos_var[a] = res["var"][go]
            cx[a] += res["dx"][go]
            cy[a] += res["dy"][go]
            far = np.hypot(cx[a] - xs[a], cy[a] - ys[a]) > cfg.max_shift
            refused[a[far]] = True
            cx[a[far]] = xs[a[far]]
            cy[a[far]] = ys[a[far]]
            still = go.copy()
            still[np.flatnonzero(go)[far]] = False
            active = active[still]
            rows = rows[still]
        # a move that would leave the image is refused as well
        ncx = np.floor(cx + 0.5)
        ncy = np.floor(cy + 0.5)
        off = ~refused & on & ((ncx < 0) | (ncx >= w) | (ncy < 0) | (ncy >= h))
        refused |= off
        ok_move = on & ~refused & ((cx != xs) | (cy != ys))
        fx[ok_move] = cx[ok_move]
        fy[ok_move] = cy[ok_move]
        moved = ok_move
        flags[refused] |= F_.FLAG_CENTROID

    if cfg.subtract_bright:
        res, refit = _fit_with_bright(frame, psf, fx, fy, centres, nbr, twin, size, cfg, model_half,
                                      ((w - 1) / 2.0, (h - 1) / 2.0))
    else:
        res, refit = _fit(frame, psf, fx, fy, centres, nbr, size, cfg, gradient=False), 0
    attrs["refit_for_bright"] = refit
    fxc = np.floor(fx[centres] + 0.5).astype(np.int64)
    fyc = np.floor(fy[centres] + 0.5).astype(np.int64)
    cflags = _mask_bits(frame, fxc, fyc, max(1.0, cfg.core_radius_fwhm * fwhm))
    edge = (fxc - half < 0) | (fxc + half >= w) | (fyc - half < 0) | (fyc + half >= h)
    cflags[edge] |= F_.FLAG_STAMP_EDGE
    cflags[~res["ok"]] |= F_.FLAG_PSF_FLUX
    cflags[res["mfrac"] > cfg.max_masked_fraction] |= F_.FLAG_MASKED_FRACTION
    cflags[blended] |= F_.FLAG_BLENDED
    cflags[crowded] |= F_.FLAG_CROWDED
    cflags[twin] |= F_.FLAG_UNRESOLVED
    flags[centres] |= cflags
    cols["x"][:] = fx
    cols["y"][:] = fy
    cols["psf_flux"][centres] = res["flux"] * scale
    var = res["var"]
    if cfg.recenter:  # a moved position was fitted: its flux error includes the position's
        mv = moved[centres]
        var = np.where(mv, np.fmax(var, pos_var[centres]), var)
    cols["psf_flux_err"][centres] = np.sqrt(var) * scale
    cols["psf_chi2"][centres] = res["chi2"]
    cols["psf_ndof"][centres] = res["ndof"].astype(np.int32)
    cols["masked_fraction"][centres] = res["mfrac"]
    cols["moved"][:] = moved
    df = pd.DataFrame(cols, columns=list(COLUMNS))
    df.attrs.update(attrs)
    return df


def sky_to_pixel(exposure: Exposure, ra, dec, tolerance_arcsec: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """Pixel positions (0-based) of sky positions (deg) through the exposure's WCS.

    NaN where a position is not finite or does not map back onto itself within
    ``tolerance_arcsec`` (e.g. on the far side of a tangent projection).
    """
    wcs = exposure.wcs
    if wcs is None:
        raise ValidationError(f"forced_at_sky: {exposure!r} has no WCS")
    ra = np.atleast_1d(np.asarray(ra, dtype=np.float64))
    dec = np.atleast_1d(np.asarray(dec, dtype=np.float64))
    if ra.shape != dec.shape or ra.ndim != 1:
        raise ValidationError(f"forced_at_sky: ra and dec must be 1-D arrays of one length, got shapes "
                              f"{ra.shape} and {dec.shape}")
    x = np.full(ra.size, np.nan)
    y = np.full(ra.size, np.nan)
    ok = np.isfinite(ra) & np.isfinite(dec) & (np.abs(dec) <= 90.0)
    if ok.any():
        with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
            warnings.simplefilter("ignore")
            px, py = wcs.all_world2pix(ra[ok], dec[ok], 0, quiet=True)
            r2, d2 = wcs.all_pix2world(px, py, 0)
        # round trip: a point the projection cannot reach comes back elsewhere (or NaN)
        sep = _separation_arcsec(ra[ok], dec[ok], np.asarray(r2), np.asarray(d2))
        good = np.isfinite(px) & np.isfinite(py) & (sep < tolerance_arcsec)
        x[np.flatnonzero(ok)[good]] = np.asarray(px)[good]
        y[np.flatnonzero(ok)[good]] = np.asarray(py)[good]
    return x, y


def _separation_arcsec(ra1, dec1, ra2, dec2) -> np.ndarray:
    r1, d1, r2, d2 = (np.radians(np.asarray(a, dtype=np.float64)) for a in (ra1, dec1, ra2, dec2))
    s = np.sin((d2 - d1) / 2) ** 2 + np.cos(d1) * np.cos(d2) * np.sin((r2 - r1) / 2) ** 2
    with np.errstate(invalid="ignore"):
        return np.degrees(2 * np.arcsin(np.sqrt(np.clip(s, 0, 1)))) * 3600.0


def forced_at_sky(exposure: Exposure, ra, dec, config: ForcedConfig | None = None) -> pd.DataFrame:
    """:func:`forced_photometry` at sky positions (deg) mapped through the exposure's WCS.

    Positions that fall off the image (or cannot be mapped) are flagged OFF_IMAGE; the
    result has ``ra, dec`` first: the given ones, or those of the final position where
    recentring moved it.
    """
    x, y = sky_to_pixel(exposure, ra, dec)
    df = forced_photometry(exposure, x, y, config)
    ra_out = np.atleast_1d(np.asarray(ra, dtype=np.float64)).copy()
    dec_out = np.atleast_1d(np.asarray(dec, dtype=np.float64)).copy()
    mv = df["moved"].to_numpy()
    if mv.any():
        r2, d2 = exposure.wcs.all_pix2world(df["x"].to_numpy()[mv], df["y"].to_numpy()[mv], 0)
        ra_out[mv] = np.asarray(r2) % 360.0
        dec_out[mv] = np.asarray(d2)
    df.insert(0, "dec", dec_out)
    df.insert(0, "ra", ra_out)
    return df
