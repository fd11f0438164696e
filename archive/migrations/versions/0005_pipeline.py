"""pipeline: input_file (registered input FITS files), pipeline_unit (outcome of each unit of work),
image_product kinds (src catalogs)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 16:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


_KIND_OLD = 'One of raw, calexp, warp, coadd, template, diff, calib.'
_KIND_NEW = ('One of calexp, warp, psf_warp, coadd, template, diff, score (FITS images) or src '
             '(a source catalog, Parquet).')
_TABLE_OLD = 'An image file on disk (raw, calexp, warp, coadd, diff) registered with its checksum.'
_TABLE_NEW = ('An image or catalog file on disk (calexp, src, warp, coadd, template, diff) registered '
              'with its checksum.')


def upgrade() -> None:
    op.alter_column('image_product', 'kind', existing_type=sa.Text(), existing_nullable=False,
                    comment=_KIND_NEW, existing_comment=_KIND_OLD)
    op.create_table_comment('image_product', _TABLE_NEW, existing_comment=_TABLE_OLD)
    op.create_table(
        'input_file',
        sa.Column('file_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Unique input-file id.'),
        sa.Column('path', sa.Text(), autoincrement=False, nullable=False,
                  comment='Absolute path of the file when it was registered.'),
        sa.Column('sha256', sa.Text(), autoincrement=False, nullable=False,
                  comment='SHA-256 of the file contents (hex); a file with the same contents is not registered twice.'),
        sa.Column('size_bytes', sa.BigInteger(), autoincrement=False, nullable=False, comment='[byte] File size.'),
        sa.Column('kind', sa.Text(), autoincrement=False, nullable=False,
                  comment='raw (a camera frame: science or calibration), calibrated (an IMAGE/MASK/VARIANCE '
                          'exposure of another pipeline) or refcat (a reference catalog, copied into the products '
                          'directory).'),
        sa.Column('imagetyp', sa.Text(), autoincrement=False, nullable=False,
                  comment='OBJECT, BIAS, DARK, FLAT or REFCAT.'),
        sa.Column('exposure_id', sa.BigInteger(), autoincrement=False, nullable=True,
                  comment='Exposure of a science frame (visit * 1000 + detector); null for calibration frames.'),
        sa.Column('visit', sa.BigInteger(), autoincrement=False, nullable=True, comment='Visit of a science frame.'),
        sa.Column('detector', sa.Integer(), autoincrement=False, nullable=True,
                  comment='Detector number (null for a reference catalog).'),
        sa.Column('band', sa.Text(), autoincrement=False, nullable=True,
                  comment='Filter band (science frames and flats).'),
        sa.Column('mjd', sa.Float(precision=53), autoincrement=False, nullable=True,
                  comment='[d] MJD (TAI) at mid-exposure.'),
        sa.Column('registered', sa.DateTime(timezone=True), autoincrement=False, nullable=False,
                  comment='UTC time of registration.'),
        sa.PrimaryKeyConstraint('file_id'),
        comment='An input FITS file registered by `archive ingest images` - a raw science or calibration frame, '
                "or another pipeline's calibrated exposure.",
    )
    op.create_index('ix_input_file_sha256', 'input_file', ['sha256'], unique=False)
    op.create_index('ix_input_file_exposure_id', 'input_file', ['exposure_id'], unique=False)
    op.create_table(
        'pipeline_unit',
        sa.Column('unit_id', sa.BigInteger(), autoincrement=False, nullable=False,
                  comment='Stable id of (step, unit_key): the first 63 bits of their SHA-256.'),
        sa.Column('step', sa.Text(), autoincrement=False, nullable=False, comment='Name of the step.'),
        sa.Column('unit_key', sa.Text(), autoincrement=False, nullable=False,
                  comment='What the unit covers, e.g. exposure:12003, band:r, field:12003, tile:4321:r.'),
        sa.Column('status', sa.Text(), autoincrement=False, nullable=False, comment='done or failed.'),
        sa.Column('reason', sa.Text(), autoincrement=False, nullable=True,
                  comment='Why the unit failed (or a note on what it did).'),
        sa.Column('config_hash', sa.Text(), autoincrement=False, nullable=False,
                  comment='SHA-256 of the step configuration it ran with.'),
        sa.Column('code_version', sa.Text(), autoincrement=False, nullable=False,
                  comment='Version of the archive package that ran it.'),
        sa.Column('inputs_hash', sa.Text(), autoincrement=False, nullable=False,
                  comment='SHA-256 of what the unit was computed from (input ids and checksums): a change makes '
                          'it pending again.'),
        sa.Column('provenance_id', sa.BigInteger(), autoincrement=False, nullable=True,
                  comment='Provenance row of its products and rows.'),
        sa.Column('updated', sa.DateTime(timezone=True), autoincrement=False, nullable=False,
                  comment='UTC time of the outcome.'),
        sa.PrimaryKeyConstraint('unit_id'),
        comment='The last outcome of one unit of work of a pipeline step (what `archive status` reports and '
                '`archive run` resumes from).',
    )
    op.create_index('ix_pipeline_unit_step', 'pipeline_unit', ['step'], unique=False)


def downgrade() -> None:
    op.create_table_comment('image_product', _TABLE_OLD, existing_comment=_TABLE_NEW)
    op.alter_column('image_product', 'kind', existing_type=sa.Text(), existing_nullable=False,
                    comment=_KIND_OLD, existing_comment=_KIND_NEW)
    op.drop_index('ix_pipeline_unit_step', table_name='pipeline_unit')
    op.drop_table('pipeline_unit')
    op.drop_index('ix_input_file_exposure_id', table_name='input_file')
    op.drop_index('ix_input_file_sha256', table_name='input_file')
    op.drop_table('input_file')
