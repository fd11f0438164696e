"""HATS metadata of the Parquet store: what LSDB, hats and other HATS readers open.

The store (:mod:`archive.catalog.parquet_store`) keeps every positional table as a
HATS catalog and writes, at each commit, the files a HATS reader looks for beside
the data: ``hats.properties`` (and its older name ``properties``),
``partition_info.csv``, ``point_map.fits`` and ``skymap.fits`` (row counts per
partition, at the partition order), ``dataset/_common_metadata`` (the schema) and,
for tables small enough that rewriting it at every commit is cheap,
``dataset/_metadata`` (every row group of every file).  Each positional table also
has a HATS *margin catalog* -- for every partition, the rows of the neighbouring
partitions within the margin threshold of its border -- and a *collection* that
names the table and its margin, so that ``lsdb.open_catalog(ROOT/collections/T)``
opens both and cross-matches near partition edges are complete.

This module only formats and computes; it knows no store.  hats itself is not a
runtime dependency of the archive: the formats are written here (FITS with astropy,
properties as text) and the tests read them back with hats and LSDB.

Margins follow HATS' (and LSDB's own generator's) definition: the margin order
``m`` is the largest HEALPix order whose pixels are at least the threshold across
(hats' estimate: average size / 1.6), and the margin of partition P holds the rows
of other partitions whose order-``m`` pixel touches P (shares an edge or a corner
with one of P's order-``m`` pixels).  Every row within the threshold of P's border
is among them; a few farther ones (up to about 2.6 thresholds) are too, which a
cross-match with a radius up to the threshold ignores.
"""

from __future__ import annotations

import io
import math
import time

import healpy as hp
import numpy as np

#: Default margin threshold (arcsec) of the margin catalogs: LSDB cross-matches with
#: a radius up to this find every pair across a partition border.
MARGIN_ARCSEC = 10.0

#: Directory (under the store root) of the HATS collections: one per positional table,
#: ``collections/<table>/collection.properties`` naming the table and its margin catalog.
COLLECTIONS_DIR = "collections"

_BUILDER = "time-domain-archive"


def margin_order(threshold_arcsec: float) -> int:
    """The HEALPix order whose pixels are at least ``threshold_arcsec`` across (hats'
    ``margin2order``: the largest order with average size >= 1.6 x the threshold)."""
    if not threshold_arcsec > 0:
        raise ValueError(f"margin threshold must be positive, got {threshold_arcsec}")
    avg_size_rad = math.radians(1.6 * float(threshold_arcsec) / 3600.0)
    return int(min(29, max(0, math.floor(math.log2(math.sqrt(math.pi / 3) / avg_size_rad)))))


def margin_name(table: str, threshold_arcsec: float) -> str:
    """Name (and directory) of a table's margin catalog, as hats-import and LSDB name them."""
    return f"{table}_{threshold_arcsec:g}arcs"


def _even_bits(v: np.ndarray) -> np.ndarray:
    """The bits of ``v`` at even positions, packed (de-interleaves a nested index)."""
    v = v & np.int64(0x5555555555555555)
    v = (v | (v >> 1)) & np.int64(0x3333333333333333)
    v = (v | (v >> 2)) & np.int64(0x0F0F0F0F0F0F0F0F)
    v = (v | (v >> 4)) & np.int64(0x00FF00FF00FF00FF)
    v = (v | (v >> 8)) & np.int64(0x0000FFFF0000FFFF)
    v = (v | (v >> 16)) & np.int64(0x00000000FFFFFFFF)
    return v


def margin_targets(healpix29: np.ndarray, order: int, morder: int) -> tuple[np.ndarray, np.ndarray]:
    """Which rows belong to the margin of which other partitions.

    ``healpix29``: the rows' order-29 pixels (any partitions); ``order``: the
    partition order; ``morder``: the margin order (> ``order``).  Returns
    ``(rows, partitions)``: row positions and the order-``order`` partition whose
    margin each goes to, one pair per (row, partition), sorted by partition then row.
    Only rows on their partition's border at the margin order are looked at, so the
    cost is in proportion to those (a few per cent of a partition's rows)."""
    if morder <= order:
        raise ValueError(f"margin order {morder} must be above the partition order {order}")
    hp29 = np.asarray(healpix29, dtype=np.int64)
    empty = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    if not hp29.size:
        return empty
    d = morder - order
    x = hp29 >> (2 * (29 - morder))                    # the rows' margin-order pixels
    local = x & np.int64((1 << (2 * d)) - 1)           # position inside the partition
    ix, iy = _even_bits(local), _even_bits(local >> 1)
    edge = (1 << d) - 1
    rows = np.flatnonzero((ix == 0) | (iy == 0) | (ix == edge) | (iy == edge))
    if not rows.size:
        return empty
    xb = x[rows]
    home = xb >> (2 * d)
    nb = hp.get_all_neighbours(1 << morder, xb, nest=True)  # (8, n), -1 where none
    part = np.where(nb >= 0, nb >> (2 * d), -1)
    ok = (part >= 0) & (part != home[None, :])
    n = np.int64(hp29.size)
    key = np.unique(np.broadcast_to(rows[None, :], part.shape)[ok] + part[ok] * n)  # one per (row, partition)
    return key % n, key // n


def partition_info_csv(pixels) -> bytes:
    """``partition_info.csv``: the (order, pixel) pairs of the non-empty partitions."""
    return ("Norder,Npix\n" + "".join(f"{o},{p}\n" for o, p in sorted(pixels))).encode()


def _properties(pairs: list[tuple[str, object]], comment: str) -> bytes:
    lines = [f"#{comment}"] + [f"{k}={v}" for k, v in pairs if v is not None]
    return ("\n".join(lines) + "\n").encode()


def _stamp() -> list[tuple[str, object]]:
    return [("hats_builder", _BUILDER), ("hats_creation_date", time.strftime("%Y-%m-%dT%H:%MUTC", time.gmtime())),
            ("hats_version", "v1.0")]


def catalog_properties(name: str, product_type: str, nrows: int, order: int, max_rows: int,
                       n_partitions: int, est_bytes: int) -> bytes:
    """``hats.properties`` of a positional table (an object or source catalog)."""
    return _properties([
        ("obs_collection", name), ("dataproduct_type", product_type), ("hats_nrows", int(nrows)),
        ("hats_col_ra", "ra"), ("hats_col_dec", "dec"), ("hats_col_healpix", "healpix29"),
        ("hats_col_healpix_order", 29), ("hats_npix_suffix", "/"), ("hats_order", int(order)),
        ("hats_skymap_order", int(order)), ("hats_max_rows", int(max_rows)),
        ("hats_estsize", int(math.ceil(est_bytes / 1024))),
        ("moc_sky_fraction", f"{n_partitions / (12 * 4 ** order):.6f}"),
    ] + _stamp(), "HATS catalog")


def margin_properties(name: str, primary: str, threshold_arcsec: float, nrows: int, order: int) -> bytes:
    """``hats.properties`` of a margin catalog (``primary``: the name of the table's catalog)."""
    return _properties([
        ("obs_collection", name), ("dataproduct_type", "margin"), ("hats_nrows", int(nrows)),
        ("hats_col_ra", "ra"), ("hats_col_dec", "dec"), ("hats_col_healpix", "healpix29"),
        ("hats_col_healpix_order", 29), ("hats_npix_suffix", "/"), ("hats_order", int(order)),
        ("hats_primary_table_url", primary), ("hats_margin_threshold", f"{threshold_arcsec:g}"),
    ] + _stamp(), "HATS catalog")


def collection_properties(name: str, primary: str, margin: str | None) -> bytes:
    """``collection.properties``: the table's catalog and (when complete) its margin."""
    return _properties([("obs_collection", name), ("hats_primary_table_url", primary),
                        ("all_margins", margin), ("default_margin", margin)] + _stamp(), "HATS collection")


def point_map_fits(order: int, counts: dict) -> bytes:
    """A HEALPix map of row counts per partition (nested, at the partition order) as
    HATS writes ``point_map.fits`` / ``skymap.fits``: implicit (every pixel) when at
    least half the sky has rows, else explicit (PIXEL, VALUE of the non-empty ones)."""
    from astropy.io import fits

    npix = 12 * 4 ** order
    pix = np.array(sorted(counts), dtype=np.int64)
    vals = np.array([counts[p] for p in pix], dtype=np.int64)
    explicit = pix.size * 2 < npix
    if explicit:
        cols = [fits.Column(name="PIXEL", format="K", array=pix), fits.Column(name="VALUE", format="K", array=vals)]
    else:
        full = np.zeros(npix, dtype=np.int64)
        full[pix] = vals
        cols = [fits.Column(name="VALUE", format="K", array=full)]
    hdu = fits.BinTableHDU.from_columns(cols, name="xtension")
    for key, value in (("PIXTYPE", "HEALPIX"), ("INDXSCHM", "EXPLICIT" if explicit else "IMPLICIT"),
                       ("ORDERING", "NESTED"), ("COORDSYS", "C"), ("NSIDE", 1 << order)):
        hdu.header[key] = value
    if explicit:
        hdu.header["OBS_NPIX"] = int(pix.size)
    else:
        hdu.header["FIRSTPIX"] = 0
        hdu.header["LASTPIX"] = npix - 1
    buf = io.BytesIO()
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(buf)
    return buf.getvalue()
