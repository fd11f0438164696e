"""association: last_mjd in the current-versions index; ra_err is an on-sky error

* ``ix_dia_object_current`` also holds ``last_mjd``: an ingest reads it with
  the footprint's current objects to see, without touching any DIASource,
  whether a batch is late (an object near it already has a later detection),
  which makes the batch re-associate those objects in time order.
* ``ra_err`` is the uncertainty on the sky (of ra*cos(dec)) and ``ra_dec_cov``
  the on-sky covariance: the column comments say so; the derived
  ``dia_object.ra_err`` and ``matched_source.ra_err``, written before as
  dec_err / cos(dec), become the isotropic on-sky error, i.e. ``dec_err``.
* ``dia_source.flags``: bit 56 marks a duplicate of its object's visit.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05 12:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_INCLUDE_OLD = ['dia_object_id', 'validity_start', 'ra', 'dec', 'ra_err', 'dec_err', 'ra_dec_cov',
                'pos_sum_w', 'n_dia_sources']
_INCLUDE_NEW = _INCLUDE_OLD + ['last_mjd']

_RA_ERR_OLD = '[deg] Uncertainty of ra.'
_RA_ERR_NEW = '[deg] Uncertainty of ra on the sky (of ra*cos(dec), degrees of arc).'
_COV_OLD = '[deg2] Covariance of ra and dec.'
_COV_NEW = '[deg2] Covariance of ra*cos(dec) and dec (on the sky).'
_FLAGS_OLD = 'OR of the mask bits within 3 px plus measurement flags.'
_FLAGS_NEW = ("OR of the mask bits within 3 px plus measurement flags; "
              "bit 56: a duplicate of its object's visit (association).")
_RA_ERR_TABLES = ['source', 'matched_source', 'dia_source', 'dia_object']
_COV_TABLES = ['source', 'dia_source', 'dia_object']


def _comments(ra_err: str, cov: str, flags: str, old_ra_err: str, old_cov: str, old_flags: str) -> None:
    for t in _RA_ERR_TABLES:
        op.alter_column(t, 'ra_err', existing_type=sa.REAL(), existing_nullable=True,
                        comment=ra_err, existing_comment=old_ra_err)
    for t in _COV_TABLES:
        op.alter_column(t, 'ra_dec_cov', existing_type=sa.REAL(), existing_nullable=True,
                        comment=cov, existing_comment=old_cov)
    op.alter_column('dia_source', 'flags', existing_type=sa.BIGINT(), existing_nullable=False,
                    comment=flags, existing_comment=old_flags)


def _current_index(include: list[str]) -> None:
    op.drop_index('ix_dia_object_current', table_name='dia_object')
    op.create_index('ix_dia_object_current', 'dia_object', ['healpix29'], unique=False,
                    postgresql_include=include, postgresql_where=sa.text('validity_end IS NULL'))


def upgrade() -> None:
    _current_index(_INCLUDE_NEW)
    _comments(_RA_ERR_NEW, _COV_NEW, _FLAGS_NEW, _RA_ERR_OLD, _COV_OLD, _FLAGS_OLD)
    # derived isotropic errors: the on-sky ra_err equals dec_err
    op.execute("UPDATE dia_object SET ra_err = dec_err WHERE ra_err IS DISTINCT FROM dec_err")
    op.execute("UPDATE matched_source SET ra_err = dec_err WHERE ra_err IS DISTINCT FROM dec_err")


def downgrade() -> None:
    op.execute("UPDATE dia_object SET ra_err = dec_err / cos(radians(dec))")
    op.execute("UPDATE matched_source SET ra_err = dec_err / cos(radians(dec))")
    _comments(_RA_ERR_OLD, _COV_OLD, _FLAGS_OLD, _RA_ERR_NEW, _COV_NEW, _FLAGS_NEW)
    _current_index(_INCLUDE_OLD)
