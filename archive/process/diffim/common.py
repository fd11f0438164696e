"""Pieces both subtraction methods (Alard-Lupton and ZOGY) use: the frame border a
convolution cannot compute, and the noise a calexp shares with a template it is an input of.
"""

from __future__ import annotations

import numpy as np

from archive.errors import ValidationError

#: The fraction of a kernel's weight that may fall past the frame before a pixel is EDGE.
EDGE_KERNEL_FRACTION = 1e-3

#: The least a difference's variance keeps of its independent-noise value where the science
#: shares noise with the template (one input alone would otherwise leave no noise at all).
MIN_VARIANCE_FRACTION = 0.05


def convolution_border(kernel: np.ndarray, fraction: float = EDGE_KERNEL_FRACTION) -> tuple[int, int]:
    """Widths (x, y; px) of the frame border where more than ``fraction`` of the kernel's
    absolute weight lies beyond the frame when the kernel is centred on a pixel."""
    a = np.abs(np.asarray(kernel, np.float64))
    total = a.sum()
    out = []
    for prof in (a.sum(axis=0), a.sum(axis=1)):  # x profile, y profile
        h = len(prof) // 2
        # weight beyond offset d on the far side of either direction: d = 0 .. h
        tail = np.array([max(prof[:h - d].sum(), prof[h + d + 1:].sum()) for d in range(h + 1)])
        out.append(int(np.argmax(tail <= fraction * total)) if total > 0 else 0)
    return out[0], out[1]


def mark_border(mask: np.ndarray, planes: dict[str, int], kernels) -> tuple[int, int]:
    """Set EDGE (bit ``planes["EDGE"]``) on the border of ``mask`` that any of ``kernels``
    cannot compute (:func:`convolution_border`, the widest of them); returns its widths (x, y)."""
    bx, by = (max(v) for v in zip(*(convolution_border(k) for k in kernels)))
    ny, nx = mask.shape
    edge = np.zeros(mask.shape, bool)
    edge[:by], edge[ny - by:], edge[:, :bx], edge[:, nx - bx:] = True, True, True, True
    mask[edge] |= np.int32(1 << planes["EDGE"])
    return int(bx), int(by)


def centred_fft(k: np.ndarray, n: int) -> np.ndarray:
    """The n x n FFT of kernel ``k`` with its centre pixel at the origin."""
    pad = np.zeros((n, n))
    h0, h1 = k.shape[0] // 2, k.shape[1] // 2
    pad[:k.shape[0], :k.shape[1]] = k
    return np.fft.fft2(np.roll(pad, (-h0, -h1), axis=(0, 1)))


def template_smoothing(psf_science_hat: np.ndarray, psf_template_hat: np.ndarray) -> np.ndarray:
    """G = P_t^ / P_s^ (|G| <= 1; 0 where the science's PSF has no power): how a
    PSF-homogenised template smoothed the noise of the science among its inputs."""
    aps = np.abs(psf_science_hat)
    g = np.where(aps > 1e-6, psf_template_hat / np.where(aps > 1e-6, psf_science_hat, 1.0), 0.0)
    return np.where(np.abs(g) > 1.0, g / np.maximum(np.abs(g), 1e-300), g)


def shared_noise_variance(variance: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    """``variance - 2 covariance`` (science and template noise shared), floored at
    :data:`MIN_VARIANCE_FRACTION` of ``variance``; covariance not finite counts as 0."""
    if covariance.shape != variance.shape:
        raise ValidationError(f"subtract: covariance {covariance.shape} and images {variance.shape} differ")
    cov = np.where(np.isfinite(covariance), covariance, 0.0)
    return np.maximum(variance - 2.0 * cov, MIN_VARIANCE_FRACTION * variance).astype(np.float32)


__all__ = ["EDGE_KERNEL_FRACTION", "MIN_VARIANCE_FRACTION", "convolution_border", "mark_border", "centred_fft",
           "template_smoothing", "shared_noise_variance"]
