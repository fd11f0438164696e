"""The pipeline layer on its own: configs, product store, input registration, runner states.

Toy steps (module level, so workers can import them) make the runner's rules quick to
check: done units are skipped, a changed config makes them stale, a failing unit is
recorded with its reason and the run goes on, and a unit's rows land whole or not at all.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from archive.api import Archive
from archive.catalog.backends import open_store
from archive.errors import ArchiveError, ValidationError
from archive.image.exposure import Exposure, ExposureInfo
from archive.pipeline.chain import build_steps, load_run_config
from archive.pipeline.config import config_from_dict, config_hash
from archive.pipeline.products import ProductRef, ProductStore, footprints_overlap
from archive.pipeline.runner import LocalExecutor, Runner, order_steps
from archive.pipeline.single_epoch import CalexpConfig, CalexpStep
from archive.pipeline.steps import Recorded, RunContext, Step, Unit


@dataclasses.dataclass
class ToyConfig:
    factor: float = dataclasses.field(default=1.0, metadata={"min": 0.0})
    fail_on: tuple[str, ...] = ()
    break_record_on: tuple[str, ...] = ()


class ToyStep(Step):
    name = "toy"
    Config = ToyConfig

    def units(self, ctx):
        return [Unit(self.name, f"n:{i}", inputs={"n": i}, payload=i, visits=(i,), bands=("r" if i % 2 else "g",))
                for i in range(1, 6)]

    def run(self, unit, shared, products):
        if unit.key in self.config.fail_on:
            raise ArchiveError(f"cannot do {unit.key}")
        return unit.payload * self.config.factor

    def record(self, ctx, unit, result, tx):
        from archive.catalog.validate import conform

        prov = self.provenance([unit.key, result])
        tx.append("provenance", conform(ctx.store.table("provenance"), pd.DataFrame([prov])))
        if unit.key in self.config.break_record_on:
            raise ValidationError(f"{unit.key}: refused halfway")
        return Recorded(note=f"value {result}", provenance_id=prov["provenance_id"])


class AfterToy(ToyStep):
    name = "after_toy"
    requires = ("toy",)


@pytest.fixture
def ctx(tmp_path):
    store = open_store(str(tmp_path / "arc"), create=True)
    yield RunContext(store, ProductStore(tmp_path / "products", store))
    store.close()


def _toy_rows(ctx) -> pd.DataFrame:
    return ctx.store.sql("SELECT inputs FROM provenance WHERE step = 'toy'")


def test_done_units_are_skipped_and_a_new_config_makes_them_stale(ctx):
    rep = Runner(ctx, [ToyStep()], progress=False).run()["toy"]
    assert sorted(rep.done) == [f"n:{i}" for i in range(1, 6)] and not rep.failed
    assert rep.notes["n:3"] == "value 3.0"
    status = Runner(ctx, [ToyStep()], progress=False).status().iloc[0]
    assert (status["units"], status["done"], status["pending"], status["stale"]) == (5, 5, 0, 0)
    again = Runner(ctx, [ToyStep()], progress=False).run()["toy"]
    assert again.done == [] and len(again.skipped) == 5
    assert len(_toy_rows(ctx)) == 5
    changed = Runner(ctx, [ToyStep({"factor": 2.0})], progress=False)
    assert changed.status().iloc[0]["stale"] == 5
    assert len(changed.run()["toy"].done) == 5
    assert changed.status().iloc[0]["done"] == 5


def test_selection_by_visits_and_bands(ctx):
    rep = Runner(ctx, [ToyStep()], progress=False).run(visits=[2, 3], bands=["r"])["toy"]
    assert rep.done == ["n:3"]


def test_a_failing_unit_is_recorded_and_the_run_goes_on(ctx):
    step = ToyStep({"fail_on": ["n:2"]})
    rep = Runner(ctx, [step], progress=False).run()["toy"]
    assert rep.failed == {"n:2": "cannot do n:2"} and len(rep.done) == 4
    st = Runner(ctx, [step], progress=False).status().iloc[0]
    assert st["failed"] == 1 and "n:2: cannot do n:2" in st["failures"]
    # nothing changed: not retried, unless asked
    assert Runner(ctx, [step], progress=False).run()["toy"].failed == {}
    assert Runner(ctx, [step], progress=False).run(retry_failed=True)["toy"].failed == {"n:2": "cannot do n:2"}
    # fixed config: the failed unit is pending again and runs; the done ones are stale too
    fixed = Runner(ctx, [ToyStep()], progress=False)
    assert fixed.status().iloc[0][["pending", "stale"]].tolist() == [1, 4]
    assert not fixed.run()["toy"].failed


def test_a_unit_lands_whole_or_not_at_all(ctx):
    step = ToyStep({"break_record_on": ["n:4"]})
    rep = Runner(ctx, [step], progress=False).run()["toy"]
    assert list(rep.failed) == ["n:4"] and "not recorded" in rep.failed["n:4"] and "halfway" in rep.failed["n:4"]
    inputs = [json.loads(i)[0] for i in _toy_rows(ctx)["inputs"]]
    assert sorted(inputs) == ["n:1", "n:2", "n:3", "n:5"]  # n:4's provenance row was rolled back


def test_steps_run_in_dependency_order_and_until(ctx):
    runner = Runner(ctx, [AfterToy(), ToyStep()], progress=False)
    assert [s.name for s in runner.steps] == ["toy", "after_toy"]
    assert list(runner.run(until="toy")) == ["toy"]
    with pytest.raises(ArchiveError, match="no step 'nope'"):
        runner.run(until="nope")

    class A(ToyStep):
        name, requires = "a", ("b",)

    class B(ToyStep):
        name, requires = "b", ("a",)

    with pytest.raises(ArchiveError, match="cycle"):
        order_steps([A(), B()])


def test_worker_processes_give_the_same_results(ctx, tmp_path):
    rep = Runner(ctx, [ToyStep({"factor": 3.0})], LocalExecutor(2), progress=False).run()["toy"]
    assert sorted(rep.results.items()) == [(f"n:{i}", 3.0 * i) for i in range(1, 6)]


# -- configs --------------------------------------------------------------------------
def test_configs_are_validated_naming_the_field():
    with pytest.raises(ValidationError, match=r"toy config\.nope"):
        ToyStep({"nope": 1})
    with pytest.raises(ValidationError, match=r"toy config\.factor: .* below its minimum"):
        ToyStep({"factor": -1.0})
    with pytest.raises(ValidationError, match=r"toy config\.factor: expected a number"):
        ToyStep({"factor": "big"})
    with pytest.raises(ValidationError, match=r"calexp config\.single_frame\.psf\.nonsense"):
        CalexpStep({"single_frame": {"psf": {"nonsense": 3}}})
    with pytest.raises(ValidationError, match=r"calexp config\.single_frame\.fit_psf: expected true or false"):
        CalexpStep({"single_frame": {"fit_psf": "yes"}})
    with pytest.raises(ArchiveError, match="unknown step 'calexpp'"):
        build_steps({"calexpp": {}})


def test_a_step_rebuilds_exactly_from_its_provenance_row():
    step = CalexpStep({"single_frame": {"fit_astrometry": False, "psf": {"max_stars": 123}}})
    row = step.provenance(["a.fits"])
    again = CalexpStep.from_provenance(row)
    assert again.config_hash == step.config_hash == row["config_hash"]
    assert again.config == step.config and again.config.single_frame.psf.max_stars == 123
    # the step keeps its own copy: changing what it hands out changes nothing
    cfg = step.config
    cfg.single_frame.psf.max_stars = 5
    assert step.config.single_frame.psf.max_stars == 123 and step.config_hash == row["config_hash"]
    assert config_hash(config_from_dict(CalexpConfig, json.loads(row["config"]))) == row["config_hash"]


def test_run_config_file_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("calexp: [unclosed")
    with pytest.raises(ArchiveError, match="not valid YAML"):
        load_run_config(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ArchiveError, match="mapping"):
        load_run_config(tmp_path / "list.json")
    (tmp_path / "ok.yaml").write_text("sources:\n  match_radius_arcsec: 2.0\n")
    steps = {s.name: s for s in build_steps(load_run_config(tmp_path / "ok.yaml"))}
    assert steps["sources"].config.match_radius_arcsec == 2.0


# -- the product store ------------------------------------------------------------------
def _exposure(ra0: float, dec0: float = 10.0, n: int = 64, band: str = "r") -> Exposure:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [n / 2 + 0.5, n / 2 + 0.5]
    w.wcs.cdelt = [-0.2 / 3600, 0.2 / 3600]
    rng = np.random.default_rng(1)
    return Exposure(rng.normal(0, 1, (n, n)).astype(np.float32), wcs=w,
                    info=ExposureInfo(band=band, visit=1, detector=2, mjd=60000.0, exp_time=30.0))


def test_product_refs_and_paths():
    assert str(ProductRef("calexp", "r", 12003).rel_path) == "calexp/r/v000012/calexp_v000012_d03.fits"
    assert str(ProductRef("coadd", "g", tile_id=4321).rel_path) == "coadd/g/t0004321/coadd_t0004321.fits"
    assert str(ProductRef("warp", "g", 12003, 4321).rel_path) == "warp/g/t0004321/warp_t0004321_v000012_d03.fits"
    assert str(ProductRef("src", "r", 12003, tag="wcs1a2b").rel_path).endswith("src_v000012_d03_wcs1a2b.parquet")
    for bad in [dict(kind="nope", band="r", exposure_id=1), dict(kind="calexp", band="r"),
                dict(kind="calexp", band="../x", exposure_id=1), dict(kind="calexp", band="r", exposure_id=1, tag="a/b")]:
        with pytest.raises(ArchiveError):
            ProductRef(**bad)
    with pytest.raises(ArchiveError, match="relative"):
        ProductStore("/tmp").path("../../etc/passwd")


def test_product_store_round_trip_verify_find_and_stale(ctx):
    a, b, far = _exposure(150.0), _exposure(150.0 + 5 / 3600), _exposure(151.0)
    prods = ctx.products
    written = [prods.write(ProductRef("calexp", "r", eid), e) for eid, e in ((1001, a), (1002, b), (1003, far))]
    w = written[0]
    back = prods.read(ProductRef("calexp", "r", 1001))
    np.testing.assert_array_equal(back.image, a.image)
    assert footprints_overlap(np.array(json.loads(written[0].corners)), np.array(json.loads(written[1].corners)))
    assert not footprints_overlap(np.array(json.loads(written[0].corners)), np.array(json.loads(written[2].corners)))
    step = ToyStep()
    prov = step.provenance([])
    rows = [x.row(100 + i, prov["provenance_id"]) for i, x in enumerate(written)]
    with ctx.store.transaction() as tx:
        from archive.catalog.validate import conform

        tx.append("provenance", conform(ctx.store.table("provenance"), pd.DataFrame([prov])))
        tx.append("image_product", conform(ctx.store.table("image_product"), pd.DataFrame(rows)))
    found = prods.find("calexp", overlapping=a)
    assert sorted(found["exposure_id"]) == [1001, 1002]
    assert len(prods.find("calexp", band="g")) == 0 and len(prods.find("calexp", exposure_ids=[1003])) == 1
    assert prods.stale("calexp", step.config_hash).empty
    assert len(prods.stale("calexp", ToyStep({"factor": 2.0}).config_hash)) == 3
    row = found[found["exposure_id"] == 1001].iloc[0]
    prods.read(row, verify=True)
    with fits.open(prods.path(w.rel), mode="update") as hdul:  # a file changed behind the archive's back
        hdul[1].data[0, 0] += 1
    with pytest.raises(ArchiveError, match="changed since registration"):
        prods.read(row, verify=True)


# -- input registration -------------------------------------------------------------------
def test_ingest_images_all_or_nothing_and_duplicates(tmp_path):
    from archive.sim.config import SimConfig
    from archive.sim.survey import simulate_survey

    sim = tmp_path / "sim"
    simulate_survey(sim, SimConfig(seed=2, n_epochs=2, size=128, n_bias=1, n_dark=1, n_flat=1, streak_epochs=()))
    raws = sorted((sim / "raw").rglob("*.fits"))
    calib = sorted((sim / "calib").rglob("*.fits"))
    (tmp_path / "junk.fits").write_bytes(b"not fits at all" * 100)
    with Archive.init(tmp_path / "arc") as arc:
        with pytest.raises(ArchiveError) as err:
            arc.ingest_images([*raws, tmp_path / "junk.fits", tmp_path / "missing.fits"])
        msg = str(err.value)
        assert "2 bad input file(s), nothing registered" in msg and "junk.fits" in msg and "missing.fits" in msg
        assert arc.count("input_file") == 0
        rep = arc.ingest_images([*raws, *calib])
        assert rep.science == 2 and rep.calibration == len(calib)
        again = arc.ingest_images([raws[0]])
        assert again.registered == [] and list(again.duplicates) == [str(raws[0].resolve())]
        copy = tmp_path / "other_visit.fits"
        with fits.open(raws[0]) as hdul:  # same visit and detector, other contents
            hdul[0].data[0, 0] += 1
            hdul.writeto(copy)
        with pytest.raises(ArchiveError, match="already registered from"):
            arc.ingest_images([copy])
        st = arc.status()
        assert st.set_index("step").loc["calexp", "pending"] == 2
