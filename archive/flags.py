"""What the bits of the archive's flag columns mean, gathered from the code that sets them.

Three columns carry bit masks:

* ``source.flags`` and ``dia_source.flags``: bits 0-31 are the image mask planes
  OR'd within 3 px of the source (the plane layout of the exposure's calexp,
  written as ``MP_*`` cards in its MASK header; exposures processed from raw
  frames use :data:`archive.image.mask.DEFAULT_MASK_PLANES`, listed here), bits
  32 up are measurement flags (:data:`archive.process.flags.MEASUREMENT_FLAGS`).
  ``dia_source.flags`` adds bit 56, set by association
  (:data:`archive.catalog.association.DUPLICATE_FLAG`).
* ``exposure.quality_flags``: the failed quality checks
  (:data:`archive.pipeline.single_epoch.QUALITY_BITS`).

The bit numbers and names come from those constants; the one-line meanings are
kept here, and a test fails when a name has none (or a meaning has no name).
``docs/flags.md`` is :func:`markdown`; ``archive flags`` prints the table and
``archive flags decode N`` names the bits set in N.
"""

from __future__ import annotations

#: The columns described, in order.
COLUMNS = ("source.flags", "dia_source.flags", "exposure.quality_flags")

#: Meaning of each mask plane and flag name.
MEANINGS = {
    # image mask planes (bits 0-31 of source/dia_source flags)
    "BAD": "bad detector pixel (hot, dead, bad column) within 3 px",
    "SAT": "saturated pixel (or one bled into by a saturated neighbour) within 3 px",
    "CR": "cosmic ray within 3 px",
    "EDGE": "too close to the image edge to measure",
    "NO_DATA": "pixels without data (outside the detector, or no inputs in a coadd) within 3 px",
    "INTRP": "interpolated pixel values within 3 px",
    "DETECTED": "inside a positive detection footprint (set for most detections)",
    "CLIPPED": "pixels rejected as artifacts when coadding within 3 px",
    "STREAK": "satellite or aircraft streak within 3 px",
    "SUSPECT": "pixels near saturation or otherwise doubtful within 3 px",
    "DETECTED_NEGATIVE": "inside a negative detection footprint",
    # measurement flags (bit 32 up)
    "STAMP_EDGE": "the PSF-fit stamp runs off the image",
    "CENTROID": "the centroid fit did not converge or hit the shift limit",
    "PSF_FLUX": "the PSF fit failed (no usable pixels)",
    "MOMENTS": "adaptive moments failed; the PSF's moments are reported",
    "BLENDED": "another source's model overlaps this one",
    "APERTURE_EDGE": "the largest aperture runs off the image or over masked pixels",
    "SECOND_PASS": "found on the residual image (a later detect-measure-subtract pass)",
    "NOT_CALIBRATED": "no photometric calibration (no reference-catalog fit, no header zero point): "
                      "the flux columns are null",
    # association
    "DUPLICATE": "a second DIASource of its object's visit: attached to the object, left out of its "
                 "summaries (see docs/association.md)",
    # exposure quality
    "WRONG_SHAPE": "the image is not 2-D or not the expected shape",
    "EMPTY": "no finite pixel",
    "CONSTANT": "all valid pixels have one value",
    "MANY_NODATA": "too many pixels without data",
    "HIGH_BACKGROUND": "the median level exceeds the allowed background",
    "HISTOGRAM_ANOMALY": "too many pixels far below the sky, or a pixel noise far from the variance plane's",
    "MANY_SATURATED": "too many saturated pixels",
    "STUCK_VALUES": "many pixels stuck at one value",
    "BAD_PSF": "PSF FWHM out of range or too elongated",
    "DOUBLE_PSF": "a secondary peak in the PSF model",
    "CHECK_ERROR": "a quality check itself failed (its message is in quality_reason)",
    "STEP_FAILED": "rejected by a later step (PSF, astrometry, photometry) without a quality flag",
    "LOW_TRANSPARENCY": "zero point well below the other epochs of the band (clouds)",
    "POOR_SEEING": "seeing much worse than the other epochs of the band",
    "NO_PHOTOCAL": "processed, but not photometrically calibrated: zero_point and lim_mag are null",
    "NEAR_BRIGHT_STAR": "within 3 FWHM of a bright template source (pixel S/N > 100, saturated, or over 20x "
                        "the DIASource's flux): may be a residual of its light",
    "DIPOLE": "a lobe of a positive/negative pair (fitted jointly): a moving or misaligned source",
}


def bits() -> list[dict]:
    """One row per bit of each flag column: ``column``, ``bit``, ``name``, ``meaning``."""
    from archive.catalog.association import DUPLICATE_FLAG
    from archive.image.mask import DEFAULT_MASK_PLANES
    from archive.pipeline.single_epoch import QUALITY_BITS
    from archive.process.flags import MEASUREMENT_FLAGS

    measured = sorted([(int(v).bit_length() - 1, k) for k, v in MEASUREMENT_FLAGS.items()])
    mask = sorted((int(b), k) for k, b in DEFAULT_MASK_PLANES.items())
    rows = []
    for column in ("source.flags", "dia_source.flags"):
        found = mask + measured
        if column == "dia_source.flags":
            from archive.process.diffim.detection import DIA_FLAGS

            found = found + sorted((int(v).bit_length() - 1, k) for k, v in DIA_FLAGS.items())
            found = found + [(int(DUPLICATE_FLAG).bit_length() - 1, "DUPLICATE")]
        rows += [{"column": column, "bit": b, "name": n, "meaning": MEANINGS.get(n, "")} for b, n in found]
    rows += [{"column": "exposure.quality_flags", "bit": b, "name": n, "meaning": MEANINGS.get(n, "")}
             for n, b in sorted(QUALITY_BITS.items(), key=lambda kv: kv[1])]
    return rows


def parse_value(text: str) -> int:
    """A flag value from the command line: decimal, ``0x`` hex or ``0b`` binary; >= 0."""
    try:
        value = int(str(text).strip().replace("_", ""), 0)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer (decimal, 0x hex or 0b binary)") from None
    if value < 0:
        raise ValueError(f"{text!r}: a flag value is not negative")
    return value


def decode(value: int, columns=COLUMNS) -> list[dict]:
    """The bits set in ``value``, per column: rows of :func:`bits`, plus ``name`` ``?`` for a
    set bit that column does not define."""
    value = int(value)
    table = bits()
    out = []
    for column in columns:
        known = {r["bit"]: r for r in table if r["column"] == column}
        b = 0
        while value >> b:
            if (value >> b) & 1:
                out.append(known.get(b) or {"column": column, "bit": b, "name": "?",
                                            "meaning": "not defined for this column"})
            b += 1
    return out


def markdown() -> str:
    """docs/flags.md."""
    rows = bits()
    blended = next(1 << r["bit"] for r in rows if r["name"] == "BLENDED")
    out = ["# Flag bits", "",
           "Generated from the code by `archive flags --markdown` (`archive flags --markdown > docs/flags.md`); "
           "`archive flags decode N` names the bits set in a value.", "",
           "`source.flags` and `dia_source.flags`: bits 0-31 are the image mask planes OR'd within 3 px "
           "of the source, in the plane layout of the exposure's calexp (its MASK header's `MP_*` cards); "
           "the bits below are the default layout, that of every exposure processed from raw frames.  "
           "Bits 32 and up are measurement flags.", "",
           "In SQL, test a bit with its value (the same on both backends; `1 << 36` would overflow a "
           f"32-bit integer on PostgreSQL): `(flags & {blended}) <> 0` selects blended sources.", ""]
    for column in COLUMNS:
        out += [f"## `{column}`", "", "| bit | value | name | meaning |", "|---:|---:|---|---|"]
        out += [f"| {r['bit']} | {1 << r['bit']} | `{r['name']}` | {r['meaning']} |"
                for r in rows if r["column"] == column]
        out.append("")
    return "\n".join(out)
