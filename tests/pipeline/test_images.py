"""Images as users fetch them: `archive image get` writes the stored product, `archive cutout`
writes FITS stamps (WCS, MASK with MP_* names, VARIANCE, PSF) of calexps, templates and
differences made by `archive run` on the simulator; errors are one line; nothing is written
to the archive."""

from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from archive.api import Archive
from archive.cli.main import main
from archive.errors import ArchiveError, NotFoundError
from archive.pipeline.products import sha256_file
from archive.sim.config import SimConfig
from simrun import simulate_and_run, tile_centre

ORDER = 9
CONFIG = {"warp": {"skymap": {"order": ORDER}}, "template": {"select": {"max_inputs": 3}}}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small survey (4 epochs of 512 px on one sky tile) run through every step."""
    root = tmp_path_factory.mktemp("imagesim")
    ra0, dec0 = tile_centre(ORDER)
    repo, reports = simulate_and_run(root, SimConfig(seed=21, n_epochs=4, size=512, ra0=ra0, dec0=dec0,
                                                     star_density=60, n_transients=3, bad_epochs={}, n_bias=2,
                                                     n_dark=2, n_flat=2, dither_arcsec=8.0), CONFIG)
    assert not any(r.failed for r in reports.values()), {k: r.failed for k, r in reports.items()}
    return repo


def _tree(repo: pathlib.Path) -> dict:
    """Every file under the archive with its size and modification time."""
    return {str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(repo.rglob("*")) if p.is_file()}


@pytest.fixture()
def repo(built, monkeypatch):
    """The archive, checked unchanged (no file added, removed or modified) after the test."""
    before = _tree(built)
    monkeypatch.setenv("ARCHIVE_REPO", str(built))
    yield built
    assert _tree(built) == before, "an image command wrote to the archive"


def _err(capsys, *argv) -> str:
    """The one-line error (exit status 2) of a command, usage mistakes included."""
    try:
        rc = main(list(map(str, argv)))
    except SystemExit as exc:  # argparse's usage errors
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def _products(repo):
    with Archive.open(repo) as arc:
        return arc.sql("SELECT * FROM image_product WHERE kind <> 'src'"), arc.products_root()


def test_image_get_writes_the_stored_file(repo, tmp_path, capsys):
    prods, root = _products(repo)
    cal = prods[prods["kind"] == "calexp"].sort_values("exposure_id").iloc[1]
    visit, det = divmod(int(cal["exposure_id"]), 1000)
    assert main(["image", "get", "calexp", "--visit", str(visit), "--detector", str(det), "-o", str(tmp_path)]) == 0
    out = pathlib.Path(capsys.readouterr().out.strip())
    assert out.parent == tmp_path and out.name == pathlib.PurePosixPath(cal["path"]).name
    assert out.read_bytes() == (root / cal["path"]).read_bytes() and sha256_file(out) == cal["sha256"]
    with fits.open(out, checksum=True) as hdul:
        assert [h.name for h in hdul][1:5] == ["IMAGE", "MASK", "VARIANCE", "PSF"]
        assert hdul["MASK"].header["MP_NO_DATA"] == 4 and hdul[0].header["VISIT"] == visit
    # by tile: the template and the coadd; a warp by tile and visit; a diff by visit alone
    tile = int(prods[prods["kind"] == "template"]["tile_id"].iloc[0])
    for argv, kind in ((["template", "--tile", str(tile)], "template"),
                       (["coadd", "--tile", str(tile)], "coadd"),
                       (["warp", "--tile", str(tile), "--visit", str(visit)], "warp"),
                       (["diff", "--visit", str(visit)], "diff")):
        target = tmp_path / f"{kind}.fits"
        assert main(["image", "get", *argv, "-o", str(target)]) == 0, argv
        capsys.readouterr()
        row = prods[(prods["kind"] == kind) & ((prods["exposure_id"] == cal["exposure_id"])
                                               if kind in ("warp", "diff") else True)].iloc[0]
        assert sha256_file(target) == row["sha256"], kind
    # the same through the API, as an Exposure
    with Archive.open(repo) as arc:
        e = arc.image("diff", visit=visit)
        assert np.array_equal(e.image, fits.getdata(tmp_path / "diff.fits", "IMAGE"), equal_nan=True)
        assert arc.image_product("template", tile=tile)["sha256"] == prods[prods["kind"] == "template"]["sha256"].iloc[0]


def test_image_get_errors(repo, tmp_path, capsys):
    prods, _ = _products(repo)
    visits = sorted(int(e) // 1000 for e in prods[prods["kind"] == "calexp"]["exposure_id"])
    assert "give the visit" in _err(capsys, "image", "get", "calexp")
    err = _err(capsys, "image", "get", "calexp", "--visit", 999)
    assert "no calexp of visit 999" in err and ", ".join(map(str, visits)) in err
    assert "no calexp of visit 1 detector 7 (detectors of that visit: 0)" in _err(
        capsys, "image", "get", "calexp", "--visit", 1, "--detector", 7)
    assert "give the tile (tiles with a template: " in _err(capsys, "image", "get", "template")
    assert "no template of tile 12 " in _err(capsys, "image", "get", "template", "--tile", 12)
    assert "unknown kind 'bogus'" in _err(capsys, "image", "get", "bogus", "--visit", 1)
    assert "unknown kind" in _err(capsys, "image", "get", "calexp' OR kind <> '", "--visit", 1)
    assert "expected a number >= 0" in _err(capsys, "image", "get", "calexp", "--visit", -1)
    assert "out of range" in _err(capsys, "image", "get", "calexp", "--visit", 10 ** 30)
    assert "no diff of visit 1 in band 'z'" in _err(capsys, "image", "get", "diff", "--visit", 1, "--band", "z")
    (tmp_path / "x.fits").write_bytes(b"mine")
    assert "exists (use --overwrite" in _err(capsys, "image", "get", "diff", "--visit", 1, "-o", tmp_path / "x.fits")
    assert (tmp_path / "x.fits").read_bytes() == b"mine"
    assert main(["image", "get", "diff", "--visit", "1", "-o", str(tmp_path / "x.fits"), "--overwrite"]) == 0
    capsys.readouterr()
    assert "no such directory" in _err(capsys, "image", "get", "diff", "--visit", 1, "-o", tmp_path / "no" / "x.fits")
    assert not list(tmp_path.glob(".*.tmp"))


def test_image_list(repo, capsys):
    assert main(["image", "list", "--kind", "diff", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("kind,band,visit,detector,") and len(lines) == 5
    assert all(line.startswith("diff,r,") for line in lines[1:])


def test_tampered_product_path_is_refused(built, tmp_path, capsys):
    """An image_product row pointing outside the products root (an attacker with write access to
    the catalog) is refused, not followed."""
    copy = tmp_path / "arc"
    shutil.copytree(built, copy, ignore=shutil.ignore_patterns("products"))
    with Archive.open(copy) as arc:
        row = arc.sql("SELECT * FROM image_product WHERE kind = 'diff'").iloc[[0]].copy()
        row["product_id"] = 1
        row["exposure_id"] = 77000
        row["path"] = "../../../../../../etc/passwd"
        arc.write("image_product", row)
    err = _err(capsys, "image", "get", "diff", "--visit", 77, "--repo", copy, "--products", built / "products",
               "-o", tmp_path / "p")
    assert "without '..'" in err and not (tmp_path / "p").exists()
    with Archive.open(copy) as arc:
        with pytest.raises(ArchiveError, match="without '..'"):
            arc.image("diff", visit=77, products=built / "products")


def _star(repo, exposure_id: int, edge: int = 40):
    """A bright, isolated star on the exposure (from its source table), away from the edges."""
    with Archive.open(repo) as arc:
        src = arc.sql(f"SELECT ra, dec, x, y, psf_flux, snr FROM source WHERE exposure_id = {exposure_id} "
                      f"AND x > {edge} AND x < {512 - edge} AND y > {edge} AND y < {512 - edge} "
                      "ORDER BY snr DESC LIMIT 1")
    return src.iloc[0]


def test_cutout_wcs_mask_variance_psf(repo, tmp_path, capsys):
    prods, root = _products(repo)
    cal = prods[prods["kind"] == "calexp"].sort_values("exposure_id").iloc[0]
    visit = int(cal["exposure_id"]) // 1000
    star = _star(repo, int(cal["exposure_id"]))
    out = tmp_path / "star.fits"
    assert main(["cutout", repr(float(star["ra"])), repr(float(star["dec"])), "4arcsec", "--visit", str(visit),
                 "-o", str(out)]) == 0
    capsys.readouterr()
    with fits.open(root / cal["path"]) as full, fits.open(out, checksum=True) as cut:
        fw, cw = WCS(full["IMAGE"].header), WCS(cut["IMAGE"].header)
        assert cut["IMAGE"].data.shape == (20, 20)  # 4" at 0.2"/px
        fx, fy = (int(np.floor(v + 0.5)) for v in fw.all_world2pix([[star["ra"], star["dec"]]], 0)[0])
        cx, cy = (int(np.floor(v + 0.5)) for v in cw.all_world2pix([[star["ra"], star["dec"]]], 0)[0])
        assert abs(fx - star["x"]) <= 1 and abs(fy - star["y"]) <= 1
        # the star's sky position is the same pixel in both: same value, mask, variance
        for hdu in ("IMAGE", "MASK", "VARIANCE"):
            assert cut[hdu].data[cy, cx] == full[hdu].data[fy, fx], hdu
        x0, y0 = fx - cx, fy - cy
        for hdu in ("IMAGE", "MASK", "VARIANCE"):
            np.testing.assert_array_equal(cut[hdu].data, full[hdu].data[y0:y0 + 20, x0:x0 + 20])
        assert cut[0].header["XY0_X"] == x0 and cut["IMAGE"].header["LTV1"] == -x0
        # every sky position of the stamp agrees with the full image's WCS
        yy, xx = np.mgrid[0:20:3, 0:20:3]
        a = cw.all_pix2world(np.column_stack([xx.ravel(), yy.ravel()]), 0)
        b = fw.all_pix2world(np.column_stack([xx.ravel() + x0, yy.ravel() + y0]), 0)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10)
        assert {k: v for k, v in cut["MASK"].header.items() if k.startswith("MP_")} == \
            {k: v for k, v in full["MASK"].header.items() if k.startswith("MP_")}
        assert cut[0].header["PRODSHA"] == cal["sha256"] and cut[0].header["PARTIAL"] is False
        psf = cut["PSF_IMAGE"].data
        assert abs(psf.sum() - 1) < 1e-4 and psf[psf.shape[0] // 2, psf.shape[1] // 2] == psf.max()
        assert "PSF" in [h.name for h in cut]


def test_edge_cutout_filled_with_nan_and_no_data(repo, tmp_path, capsys):
    prods, root = _products(repo)
    cal = prods[prods["kind"] == "calexp"].sort_values("exposure_id").iloc[0]
    visit = int(cal["exposure_id"]) // 1000
    with fits.open(root / cal["path"]) as full:
        w = WCS(full["IMAGE"].header)
        ra, dec = (float(v) for v in w.all_pix2world([[509.0, 2.0]], 0)[0])  # bottom-right corner
        data = full["IMAGE"].data.copy()
    out = tmp_path / "edge.fits"
    assert main(["cutout", repr(ra), repr(dec), "11px", "--visit", str(visit), "-o", str(out)]) == 0
    assert "1 run(s) off the image" in capsys.readouterr().err
    with fits.open(out) as cut:
        img, mask, var = cut["IMAGE"].data, cut["MASK"].data, cut["VARIANCE"].data
        assert img.shape == (11, 11)
        off = np.zeros((11, 11), bool)
        off[:, 8:] = True   # x >= 512
        off[:3, :] = True   # y < 0
        assert np.isnan(img[off]).all() and np.isnan(var[off]).all()
        assert ((mask[off] & (1 << cut["MASK"].header["MP_NO_DATA"])) != 0).all()
        np.testing.assert_array_equal(img[~off], data[0:8, 504:512].ravel())
        h = cut[0].header
        assert h["PARTIAL"] is True and h["NOFFIMG"] == int(off.sum()) and "NO_DATA" in str(h["COMMENT"])


def test_science_template_difference_stamps(repo, tmp_path, capsys):
    with Archive.open(repo) as arc:
        rows = arc.sql("SELECT dia_source_id, ra, dec, exposure_id FROM dia_source ORDER BY snr DESC LIMIT 1")
    dia = {c: rows[c].iloc[0] for c in rows.columns}  # (a row as a Series would make the int64 ids floats)
    prods, root = _products(repo)
    outdir = tmp_path / "stamps"
    assert main(["cutout", "--dia-source", str(int(dia["dia_source_id"])), "31px", "-o", str(outdir)]) == 0
    written = [pathlib.Path(p) for p in capsys.readouterr().out.split()]
    v, d = divmod(int(dia["exposure_id"]), 1000)
    assert [p.name for p in written] == [f"{k}_v{v:06d}_d{d:02d}.fits" for k in ("calexp", "template", "diff")]
    hduls = [fits.open(p, checksum=True) for p in written]
    try:
        wcs = [WCS(h["IMAGE"].header) for h in hduls]
        centre = [w.all_world2pix([[dia["ra"], dia["dec"]]], 0)[0] for w in wcs]
        for h, c in zip(hduls, centre):  # one grid: the same shape, the position at the same pixel
            assert h["IMAGE"].data.shape == (31, 31)
            np.testing.assert_allclose(c, centre[0], atol=1e-6)
            assert h[0].header["CUTRA"] == pytest.approx(dia["ra"]) and "PSF_IMAGE" in [x.name for x in h]
        assert [h[0].header["PRODKIND"] for h in hduls] == ["calexp", "template", "diff"]
        assert hduls[1][0].header["RESAMPLD"] is True
        tpl = prods[prods["kind"] == "template"]
        assert hduls[1][0].header["TILEIDS"] == ",".join(str(int(t)) for t in tpl["tile_id"])
        assert np.isfinite(hduls[1]["IMAGE"].data).all()
        # the difference stamp is the stored difference's pixels on the same box as the science stamp
        diff_row = prods[(prods["kind"] == "diff") & (prods["exposure_id"] == dia["exposure_id"])].iloc[0]
        x0, y0 = hduls[0][0].header["XY0_X"], hduls[0][0].header["XY0_Y"]
        assert (hduls[2][0].header["XY0_X"], hduls[2][0].header["XY0_Y"]) == (x0, y0)
        full = fits.getdata(root / diff_row["path"], "IMAGE")
        np.testing.assert_array_equal(hduls[2]["IMAGE"].data, full[y0:y0 + 31, x0:x0 + 31])
        # the DIASource is in the difference stamp: its centre is well above the noise
        cy, cx = 15, 15
        dv = hduls[2]["VARIANCE"].data[cy - 1:cy + 2, cx - 1:cx + 2]
        assert hduls[2]["IMAGE"].data[cy - 1:cy + 2, cx - 1:cx + 2].sum() > 3 * np.sqrt(dv.sum())
    finally:
        for h in hduls:
            h.close()
    # the same through the API, and --kind all with --visit
    with Archive.open(repo) as arc:
        stamps = arc.cutouts(dia["ra"], dia["dec"], "31px", kind="all", visit=v)
        assert [s.source["PRODKIND"][0] for s in stamps] == ["calexp", "template", "diff"]
        np.testing.assert_array_equal(stamps[2].exposure.image, fits.getdata(written[2], "IMAGE"))


def test_every_exposure_covering_a_position(repo, tmp_path, capsys):
    prods, _ = _products(repo)
    star = _star(repo, int(prods[prods["kind"] == "calexp"]["exposure_id"].min()), edge=80)
    assert main(["cutout", repr(float(star["ra"])), repr(float(star["dec"])), "5", "--kind", "calexp",
                 "-o", str(tmp_path / "series")]) == 0
    names = [pathlib.Path(p).name for p in capsys.readouterr().out.split()]
    with Archive.open(repo) as arc:
        order = arc.sql("SELECT visit, detector FROM exposure WHERE status = 'processed' ORDER BY mjd_mid")
    assert names == [f"calexp_v{v:06d}_d{d:02d}.fits" for v, d in order.itertuples(index=False)]
    with Archive.open(repo) as arc:
        with pytest.raises(ArchiveError, match="give the visit"):
            arc.cutout(star["ra"], star["dec"], 5.0)
        one = arc.cutout(star["ra"], star["dec"], 5.0, kind="template")
        assert one.source["PRODKIND"][0] == "template" and "TILEID" in one.source
        assert one.exposure.shape == (25, 25)


def test_cutout_errors(repo, tmp_path, capsys):
    prods, _ = _products(repo)
    cal = prods[prods["kind"] == "calexp"].iloc[0]
    ra, dec, visit = float(cal["ra"]), float(cal["dec"]), int(cal["exposure_id"]) // 1000
    assert "no calexp covers (10.0000000, 10.0000000)" in _err(capsys, "cutout", 10, 10, 10)
    assert "no template covers" in _err(capsys, "cutout", 10, 10, 10, "--kind", "template")
    assert "is not on the calexp of visit" in _err(capsys, "cutout", ra + 0.5, dec, 10, "--visit", visit)
    assert "must be finite" in _err(capsys, "cutout", "nan", dec, 10)
    assert "must be finite" in _err(capsys, "cutout", ra, "inf", 10)
    assert "within [-90, 90]" in _err(capsys, "cutout", ra, 91, 10)
    assert "is not a number" in _err(capsys, "cutout", "abc", dec, 10)
    assert "positive finite" in _err(capsys, "cutout", ra, dec, -5)
    assert "positive finite" in _err(capsys, "cutout", ra, dec, 0)
    assert "positive finite" in _err(capsys, "cutout", ra, dec, "nanpx")
    assert "limit of 2048 px" in _err(capsys, "cutout", ra, dec, "4096px")
    assert "limit of 2048 px" in _err(capsys, "cutout", ra, dec, "1e12")
    assert "unknown kind 'raw'" in _err(capsys, "cutout", ra, dec, 10, "--kind", "raw")
    assert "give the visit (or a dia_source id)" in _err(capsys, "cutout", ra, dec, 10, "--kind", "all")
    assert "no dia_source with id 12345" in _err(capsys, "cutout", "--dia-source", 12345, 10)
    assert "expected RA DEC SIZE" in _err(capsys, "cutout", ra, 10)
    assert "no calexp of visit 999" in _err(capsys, "cutout", ra, dec, 10, "--visit", 999)
    err = _err(capsys, "cutout", ra, dec, 10, "--kind", "all", "--visit", visit, "-o", tmp_path / "one.fits")
    assert "3 stamps" in err and "give -o a directory" in err and not (tmp_path / "one.fits").exists()
    with Archive.open(repo) as arc:
        with pytest.raises(NotFoundError, match="no diff of visit 999"):
            arc.cutouts(ra, dec, 10, kind="diff", visit=999)
    out = tmp_path / "a.fits"
    assert main(["cutout", repr(ra), repr(dec), "5", "--visit", str(visit), "-o", str(out)]) == 0
    capsys.readouterr()
    before = out.read_bytes()
    assert "exists (use --overwrite" in _err(capsys, "cutout", ra, dec, 7, "--visit", visit, "-o", out)
    assert out.read_bytes() == before and not list(tmp_path.glob(".*.tmp"))


def test_changed_product_file_is_refused(built, tmp_path, capsys):
    """A product file changed after registration is not handed out as if it were the product."""
    copy = tmp_path / "arc"
    shutil.copytree(built, copy)
    prods = Archive.open(copy).sql("SELECT * FROM image_product WHERE kind = 'calexp'")
    row = prods.iloc[0]
    path = copy / "products" / row["path"]
    with fits.open(path, mode="update") as hdul:
        hdul["IMAGE"].data[5, 5] += 1.0
    v = int(row["exposure_id"]) // 1000
    assert "SHA-256 differs" in _err(capsys, "image", "get", "calexp", "--visit", v, "--repo", copy,
                                     "-o", tmp_path / "x.fits")
    assert not (tmp_path / "x.fits").exists()
    assert "SHA-256 differs" in _err(capsys, "cutout", row["ra"], row["dec"], 5, "--visit", v, "--repo", copy,
                                     "-o", tmp_path / "y.fits")
    os.remove(path)
    assert "product file is missing" in _err(capsys, "image", "get", "calexp", "--visit", v, "--repo", copy)
    pd.testing.assert_frame_equal(prods, Archive.open(copy).sql("SELECT * FROM image_product WHERE kind = 'calexp'"))
