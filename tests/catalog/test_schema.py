import pyarrow as pa
import pytest

from archive.catalog.schema import _parse, load_schema, markdown_docs, sqlalchemy_metadata


def test_required_tables_present():
    s = load_schema()
    for name in ["exposure", "image_product", "provenance", "source", "matched_source",
                 "dia_source", "dia_object", "dia_forced_source"]:
        assert name in s.tables


def test_positional_tables_have_healpix29():
    s = load_schema()
    for t in s:
        if t.positional:
            assert t.column("healpix29").type == "int64"
            assert not t.column("healpix29").nullable


def test_per_band_expansion():
    s = load_schema()
    obj = s["dia_object"]
    for band in s.bands:
        assert obj.column(f"{band}_psf_flux_mean").unit == "nJy"
        assert obj.column(f"{band}_psf_flux_ndata").type == "int32"


def test_arrow_and_sql_agree():
    s = load_schema()
    md = sqlalchemy_metadata(s)
    for t in s:
        arrow = t.arrow_schema
        assert isinstance(arrow, pa.Schema)
        assert arrow.names == [c.name for c in md.tables[t.name].columns]
        pk = [c.name for c in md.tables[t.name].primary_key.columns]
        assert pk == list(t.primary_key)


def test_unknown_table_error_lists_tables():
    with pytest.raises(KeyError, match="unknown table 'nope'.*dia_source"):
        load_schema()["nope"]


def test_bad_schema_rejected():
    doc = {"version": 1, "bands": ["g"], "tables": {"t": {
        "primary_key": ["id"], "columns": {"id": {"type": "int128"}}}}}
    with pytest.raises(ValueError, match="unknown type 'int128'"):
        _parse(doc)
    doc["tables"]["t"]["columns"]["id"]["type"] = "int64"
    doc["tables"]["t"]["primary_key"] = ["missing"]
    with pytest.raises(KeyError, match="no column 'missing'"):
        _parse(doc)


def test_docs_mention_every_column():
    text = markdown_docs()
    for t in load_schema():
        assert f"## `{t.name}`" in text
        for c in t.columns:
            assert f"`{c.name}`" in text


def test_committed_docs_are_current():
    import pathlib

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "schema.md"
    assert doc.read_text() == markdown_docs() + "\n", "regenerate: archive schema > docs/schema.md"


def test_ucds_are_standard_words():
    """Every ``ucd`` of tables.yaml is valid UCD1+ (astropy checks the controlled vocabulary)."""
    from astropy.io.votable.ucd import parse_ucd

    n = 0
    for t in load_schema():
        for c in t.columns:
            if c.ucd:
                parse_ucd(c.ucd, check_controlled_vocabulary=True, has_colon=False)
                n += 1
    assert n > 150
    s = load_schema()
    assert s["dia_source"].column("ra").ucd == "pos.eq.ra;meta.main"
    assert s["dia_source"].column("mjd").ucd == "time.epoch"
    assert s["source"].column("psf_flux").ucd == "phot.flux"
    assert s["dia_object"].column("dia_object_id").ucd == "meta.id;meta.main"


def test_units_parse_with_astropy():
    from archive.catalog.schema import astropy_unit

    for t in load_schema():
        for c in t.columns:
            if c.unit:
                assert astropy_unit(c.unit).to_string("vounit")
    assert str(astropy_unit("nJy-1")) == "1 / nJy"


def test_column_keys_and_ucd_syntax_checked():
    doc = {"version": 1, "bands": ["g"], "tables": {"t": {
        "primary_key": ["id"], "columns": {"id": {"type": "int64", "ucd": "meta.id;meta.main"}}}}}
    assert _parse(doc)["t"].column("id").ucd == "meta.id;meta.main"
    doc["tables"]["t"]["columns"]["id"]["ucd"] = "meta id"
    with pytest.raises(ValueError, match="not a UCD"):
        _parse(doc)
    doc["tables"]["t"]["columns"]["id"] = {"type": "int64", "ucdd": "meta.id"}
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['ucdd'\]"):
        _parse(doc)


def test_ucd_is_not_part_of_the_database_schema():
    """UCDs describe outputs; the SQL comments (and so Alembic's view) carry unit + description only."""
    md = sqlalchemy_metadata()
    for t in load_schema():
        for c in t.columns:
            comment = md.tables[t.name].c[c.name].comment
            assert (c.ucd or "\x00") not in comment


def test_column_meta_for_results():
    s = load_schema()
    meta = s.column_meta(["ra", "psf_flux", "count", "mjd"], "dia_source")
    assert meta["ra"] == {"unit": "deg", "ucd": "pos.eq.ra;meta.main", "description": "Right ascension (ICRS)."}
    assert "count" not in meta
    # without a table: what every table agrees on (ra's description differs between tables)
    free = s.column_meta(["ra", "healpix29"])
    assert free["ra"]["unit"] == "deg" and free["ra"]["ucd"] == "pos.eq.ra;meta.main"
    assert free["ra"]["description"] is None
    assert free["healpix29"]["ucd"] == "pos.healpix"


def test_reading_the_schema_needs_neither_pyarrow_nor_sqlalchemy():
    import subprocess
    import sys

    code = ("import sys; from archive.catalog.schema import load_schema; load_schema()['source']; "
            "print(sorted(m for m in ('pyarrow', 'sqlalchemy', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
