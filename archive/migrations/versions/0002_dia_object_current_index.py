"""dia_object: partial covering index of the current versions; drop redundant indexes

Association reads, for every current DIAObject of a visit's footprint, only
its position, errors, count, weight, id and validity start.  A B-tree on
healpix29 holding exactly those columns (INCLUDE) for the current versions
(WHERE validity_end IS NULL) answers that read with an index-only scan instead
of one random heap page per object.  It also serves "current versions"
lookups, which made ix_dia_object_validity_end redundant; ix_dia_object_dia_object_id
duplicated the leading column of the primary key (dia_object_id, validity_start).
Each index dropped is one index entry less to write per new or closed version.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 01:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_INCLUDE = ['dia_object_id', 'validity_start', 'ra', 'dec', 'ra_err', 'dec_err', 'ra_dec_cov',
            'pos_sum_w', 'n_dia_sources']


def upgrade() -> None:
    op.create_index('ix_dia_object_current', 'dia_object', ['healpix29'], unique=False,
                    postgresql_include=_INCLUDE, postgresql_where=sa.text('validity_end IS NULL'))
    op.drop_index('ix_dia_object_validity_end', table_name='dia_object')
    op.drop_index('ix_dia_object_dia_object_id', table_name='dia_object')


def downgrade() -> None:
    op.create_index('ix_dia_object_dia_object_id', 'dia_object', ['dia_object_id'], unique=False)
    op.create_index('ix_dia_object_validity_end', 'dia_object', ['validity_end'], unique=False)
    op.drop_index('ix_dia_object_current', table_name='dia_object')
