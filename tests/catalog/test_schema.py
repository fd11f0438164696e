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
