"""forced photometry at any list of positions: template_source (the templates' own catalogs, with
is_primary), template_forced_source (their forced fluxes on every difference image),
dia_template_source (forced fluxes on the templates at DIAObject and DIASource positions),
forced_list and list_forced_source (a user's list of positions on every epoch)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-20 12:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('dia_template_source',
    sa.Column('dia_template_source_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Unique id.'),
    sa.Column('dia_object_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='DIAObject measured (or whose DIASource was).'),
    sa.Column('dia_source_id', sa.BigInteger(), autoincrement=False, nullable=True, comment="DIASource whose position was measured; null: the DIAObject's position."),
    sa.Column('tile_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Sky tile of the template.'),
    sa.Column('band', sa.Text(), autoincrement=False, nullable=False, comment='Filter band of the template.'),
    sa.Column('image', sa.Text(), autoincrement=False, nullable=False, comment='Image measured on: template.'),
    sa.Column('ra', sa.Float(precision=53), autoincrement=False, nullable=False, comment='[deg] Right ascension measured at.'),
    sa.Column('dec', sa.Float(precision=53), autoincrement=False, nullable=False, comment='[deg] Declination measured at.'),
    sa.Column('healpix29', sa.BigInteger(), autoincrement=False, nullable=False, comment='Nested HEALPix order-29 index.'),
    sa.Column('x', sa.REAL(), autoincrement=False, nullable=True, comment='[pix] Column on the tile grid (0-based).'),
    sa.Column('y', sa.REAL(), autoincrement=False, nullable=True, comment='[pix] Row on the tile grid (0-based).'),
    sa.Column('psf_flux', sa.Float(precision=53), autoincrement=False, nullable=True, comment='[nJy] Forced PSF flux on the template.'),
    sa.Column('psf_flux_err', sa.Float(precision=53), autoincrement=False, nullable=True, comment='[nJy] Uncertainty of psf_flux.'),
    sa.Column('flags', sa.BigInteger(), autoincrement=False, nullable=False, comment='OR of the mask bits under the PSF plus forced-measurement flags.'),
    sa.Column('is_primary', sa.Boolean(), autoincrement=False, nullable=False, comment="True when the position lies in the tile's core: one row per position and band is primary."),
    sa.PrimaryKeyConstraint('dia_template_source_id'),
    comment='Forced PSF photometry on the template (coadd) at DIAObject and DIASource positions, one row per position and template tile, so that a light curve goes on an absolute flux scale (template flux + difference flux).'
    )
    op.create_index('ix_dia_template_source_dia_object_id', 'dia_template_source', ['dia_object_id'], unique=False)
    op.create_index('ix_dia_template_source_healpix29', 'dia_template_source', ['healpix29'], unique=False)
    op.create_index('ix_dia_template_source_tile_id_band', 'dia_template_source', ['tile_id', 'band'], unique=False)
    op.create_table('forced_list',
    sa.Column('list_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='List id: the first 63 bits of SHA-256 of its positions and options (the same list registered again is the same list).'),
    sa.Column('name', sa.Text(), autoincrement=False, nullable=False, comment="Name of the list (the file's stem unless given)."),
    sa.Column('source_path', sa.Text(), autoincrement=False, nullable=False, comment='The file it was read from.'),
    sa.Column('path', sa.Text(), autoincrement=False, nullable=False, comment='Its copy (list_object_id, ra, dec; Parquet) relative to the products root.'),
    sa.Column('sha256', sa.Text(), autoincrement=False, nullable=False, comment='SHA-256 of the copy.'),
    sa.Column('n_rows', sa.BigInteger(), autoincrement=False, nullable=False, comment='Positions in the list.'),
    sa.Column('images', sa.Text(), autoincrement=False, nullable=False, comment='Images measured: calexp, diff or both.'),
    sa.Column('recenter', sa.Boolean(), autoincrement=False, nullable=False, comment="True: positions may move at most 0.2 px in at most two iterations (LAST's rule); false: fixed."),
    sa.Column('registered', sa.DateTime(timezone=True), autoincrement=False, nullable=False, comment='UTC time of registration.'),
    sa.PrimaryKeyConstraint('list_id'),
    comment="A user's list of positions registered by `archive forced --list`, measured on every calexp (and difference when asked) by the forced_list step."
    )
    op.create_index('ix_forced_list_sha256', 'forced_list', ['sha256'], unique=False)
    op.create_table('list_forced_source',
    sa.Column('list_forced_source_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Unique id.'),
    sa.Column('list_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='List the position belongs to.'),
    sa.Column('list_object_id', sa.BigInteger(), autoincrement=False, nullable=False, comment="The position's id in the user's list."),
    sa.Column('exposure_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Exposure measured.'),
    sa.Column('visit', sa.BigInteger(), autoincrement=False, nullable=False, comment='Visit number.'),
    sa.Column('detector', sa.Integer(), autoincrement=False, nullable=False, comment='Detector number.'),
    sa.Column('band', sa.Text(), autoincrement=False, nullable=False, comment='Filter band.'),
    sa.Column('mjd', sa.Float(precision=53), autoincrement=False, nullable=False, comment='[d] MJD (TAI) at mid-exposure.'),
    sa.Column('image', sa.Text(), autoincrement=False, nullable=False, comment='Image measured on: calexp or diff.'),
    sa.Column('forced', sa.Boolean(), autoincrement=False, nullable=False, comment='True: measured at a given position (not a detection).'),
    sa.Column('moved', sa.Boolean(), autoincrement=False, nullable=False, comment='True when recentring moved the position (at most 0.2 px).'),
    sa.Column('ra', sa.Float(precision=53), autoincrement=False, nullable=False, comment='[deg] Right ascension measured at.'),
    sa.Column('dec', sa.Float(precision=53), autoincrement=False, nullable=False, comment='[deg] Declination measured at.'),
    sa.Column('healpix29', sa.BigInteger(), autoincrement=False, nullable=False, comment='Nested HEALPix order-29 index.'),
    sa.Column('x', sa.REAL(), autoincrement=False, nullable=True, comment='[pix] Column on the exposure (0-based).'),
    sa.Column('y', sa.REAL(), autoincrement=False, nullable=True, comment='[pix] Row on the exposure (0-based).'),
    sa.Column('psf_flux', sa.Float(precision=53), autoincrement=False, nullable=True, comment='[nJy] Forced PSF flux (nJy).'),
    sa.Column('psf_flux_err', sa.Float(precision=53), autoincrement=False, nullable=True, comment='[nJy] Uncertainty of psf_flux.'),
    sa.Column('flags', sa.BigInteger(), autoincrement=False, nullable=False, comment='OR of the mask bits under the PSF plus forced-measurement flags (CENTROID: recentring refused).'),
    sa.PrimaryKeyConstraint('list_forced_source_id'),
    comment="Forced PSF photometry at the positions of a user's list (forced_list) on calexps and difference images."
    )
    op.create_index('ix_list_forced_source_exposure_id', 'list_forced_source', ['exposure_id'], unique=False)
    op.create_index('ix_list_forced_source_healpix29', 'list_forced_source', ['healpix29'], unique=False)
    op.create_index('ix_list_forced_source_list_id_list_object_id', 'list_forced_source', ['list_id', 'list_object_id'], unique=False)
    op.create_table('template_forced_source',
    sa.Column('template_forced_source_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Unique id.'),
    sa.Column('template_source_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Template source whose position was measured.'),
    sa.Column('exposure_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Exposure whose difference image was measured.'),
    sa.Column('visit', sa.BigInteger(), autoincrement=False, nullable=False, comment='Visit number.'),
    sa.Column('detector', sa.Integer(), autoincrement=False, nullable=False, comment='Detector number.'),
    sa.Column('band', sa.Text(), autoincrement=False, nullable=False, comment='Filter band.'),
    sa.Column('mjd', sa.Float(precision=53), autoincrement=False, nullable=False, comment='[d] MJD (TAI) at mid-exposure.'),
    sa.Column('ra', sa.Float(precision=53), autoincrement=False, nullable=False, comment="[deg] Right ascension measured at (the template source's)."),
    sa.Column('dec', sa.Float(precision=53), autoincrement=False, nullable=False, comment='[deg] Declination measured at.'),
    sa.Column('healpix29', sa.BigInteger(), autoincrement=False, nullable=False, comment='Nested HEALPix order-29 index.'),
    sa.Column('x', sa.REAL(), autoincrement=False, nullable=True, comment='[pix] Column on the exposure (0-based).'),
    sa.Column('y', sa.REAL(), autoincrement=False, nullable=True, comment='[pix] Row on the exposure (0-based).'),
    sa.Column('psf_flux', sa.Float(precision=53), autoincrement=False, nullable=True, comment='[nJy] Forced PSF flux on the difference image.'),
    sa.Column('psf_flux_err', sa.Float(precision=53), autoincrement=False, nullable=True, comment='[nJy] Uncertainty of psf_flux.'),
    sa.Column('flags', sa.BigInteger(), autoincrement=False, nullable=False, comment='OR of the mask bits under the PSF plus forced-measurement flags.'),
    sa.PrimaryKeyConstraint('template_forced_source_id'),
    comment="Forced PSF photometry at every primary template source on every difference image that covers it, in the exposure's band, whether or not anything was detected there."
    )
    op.create_index('ix_template_forced_source_exposure_id', 'template_forced_source', ['exposure_id'], unique=False)
    op.create_index('ix_template_forced_source_healpix29', 'template_forced_source', ['healpix29'], unique=False)
    op.create_index('ix_template_forced_source_template_source_id', 'template_forced_source', ['template_source_id'], unique=False)
    op.create_table('template_source',
    sa.Column('template_source_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Unique template-source id.'),
    sa.Column('tile_id', sa.BigInteger(), autoincrement=False, nullable=False, comment='Sky tile of the template.'),
    sa.Column('band', sa.Text(), autoincrement=False, nullable=False, comment='Filter band of the template.'),
    sa.Column('ra', sa.Float(precision=53), autoincrement=False, nullable=False, comment='[deg] Right ascension of the centroid.'),
    sa.Column('dec', sa.Float(precision=53), autoincrement=False, nullable=False, comment='[deg] Declination of the centroid.'),
    sa.Column('healpix29', sa.BigInteger(), autoincrement=False, nullable=False, comment='Nested HEALPix order-29 index.'),
    sa.Column('x', sa.REAL(), autoincrement=False, nullable=True, comment='[pix] Column on the tile grid (0-based).'),
    sa.Column('y', sa.REAL(), autoincrement=False, nullable=True, comment='[pix] Row on the tile grid (0-based).'),
    sa.Column('psf_flux', sa.Float(precision=53), autoincrement=False, nullable=True, comment='[nJy] PSF flux on the template.'),
    sa.Column('psf_flux_err', sa.Float(precision=53), autoincrement=False, nullable=True, comment='[nJy] Uncertainty of psf_flux.'),
    sa.Column('flags', sa.BigInteger(), autoincrement=False, nullable=False, comment='Measurement flags (as source.flags).'),
    sa.Column('is_primary', sa.Boolean(), autoincrement=False, nullable=False, comment="True for the copy whose position lies in its own tile's core: count and forced-measure these only."),
    sa.PrimaryKeyConstraint('template_source_id'),
    comment="Static sources detected and measured on a template (coadd) of one sky tile and band, once per template; is_primary marks the copy whose position lies in its own tile's core (the HEALPix pixel), so overlapping tiles never count an object twice."
    )
    op.create_index('ix_template_source_healpix29', 'template_source', ['healpix29'], unique=False)
    op.create_index('ix_template_source_tile_id_band', 'template_source', ['tile_id', 'band'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_template_source_tile_id_band', table_name='template_source')
    op.drop_index('ix_template_source_healpix29', table_name='template_source')
    op.drop_table('template_source')
    op.drop_index('ix_template_forced_source_template_source_id', table_name='template_forced_source')
    op.drop_index('ix_template_forced_source_healpix29', table_name='template_forced_source')
    op.drop_index('ix_template_forced_source_exposure_id', table_name='template_forced_source')
    op.drop_table('template_forced_source')
    op.drop_index('ix_list_forced_source_list_id_list_object_id', table_name='list_forced_source')
    op.drop_index('ix_list_forced_source_healpix29', table_name='list_forced_source')
    op.drop_index('ix_list_forced_source_exposure_id', table_name='list_forced_source')
    op.drop_table('list_forced_source')
    op.drop_index('ix_forced_list_sha256', table_name='forced_list')
    op.drop_table('forced_list')
    op.drop_index('ix_dia_template_source_tile_id_band', table_name='dia_template_source')
    op.drop_index('ix_dia_template_source_healpix29', table_name='dia_template_source')
    op.drop_index('ix_dia_template_source_dia_object_id', table_name='dia_template_source')
    op.drop_table('dia_template_source')
