"""source.extendedness: a 0..1 score of how much broader than the PSF a source is

The size excess over the PSF is measured by a PSF + broadening-template fit
(archive/process/extendedness.py); the score is >= 0.5 for extended (resolved)
sources and < 0.5 for point-like ones; null where not measured (rows written
before this revision).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 14:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

_COMMENT = ("Extendedness score 0..1 from the size excess over the PSF (fit of PSF + broadening template); "
            ">= 0.5: extended (resolved), < 0.5: point-like; null when not measured.")


def upgrade() -> None:
    op.add_column('source', sa.Column('extendedness', sa.REAL(), nullable=True, comment=_COMMENT))


def downgrade() -> None:
    op.drop_column('source', 'extendedness')
