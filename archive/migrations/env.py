"""Alembic environment: online migrations only, URL from the config set by archive.catalog.migrate."""

from alembic import context
from sqlalchemy import create_engine

from archive.catalog.schema import sqlalchemy_metadata

target_metadata = sqlalchemy_metadata()


def run_migrations_online() -> None:
    url = context.config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (SQL script) migrations are not supported; give a database URL")
run_migrations_online()
