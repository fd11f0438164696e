"""Alembic migrations of the Postgres schema, driven from Python (no alembic.ini needed).

The revisions live in ``archive/migrations/versions``; ``tests/catalog`` checks
that applying them all yields exactly the tables derived from the schema YAML.
"""

from __future__ import annotations

from importlib import resources

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(resources.files("archive.migrations")))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    """The newest revision id shipped with this code."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def current_revision(url: str) -> str | None:
    """The revision a database is at (None when it has never been migrated)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as con:
            return MigrationContext.configure(con).get_current_revision()
    finally:
        engine.dispose()


def upgrade(url: str, revision: str = "head") -> str:
    """Bring the database at ``url`` to ``revision``; returns the revision reached."""
    command.upgrade(alembic_config(url), revision)
    return current_revision(url)


#: Role attributes that no read-only role may have (pg_roles column: keyword).
_PRIVILEGED_ATTRS = {"rolsuper": "SUPERUSER", "rolcreaterole": "CREATEROLE", "rolcreatedb": "CREATEDB",
                     "rolreplication": "REPLICATION", "rolbypassrls": "BYPASSRLS"}
#: Predefined roles whose membership lets a role read or write server files or signal backends.
_PRIVILEGED_ROLES = ("pg_read_server_files", "pg_write_server_files", "pg_execute_server_program",
                     "pg_signal_backend", "pg_write_all_data", "pg_monitor")
#: Functions a reader should not execute (granted to PUBLIC by default): large objects
#: (server-side storage and file import/export) and advisory locks (which could block
#: the archive's writers).  Revoked from PUBLIC and granted back to the role that runs
#: the command (the archive's owner), which takes advisory locks when it associates.
_REVOKED_FUNCTIONS = r"^(lo_.*|loread|lowrite|pg_advisory_.*|pg_try_advisory_.*|dblink.*)$"


def grant_read_only(url: str, role: str) -> list[str]:
    """Make ``role`` a login role that can only read the archive's tables; returns what was done.

    Point ``archive sql`` users at ``postgresql+psycopg://ROLE@host/db``: beside
    the query guard and the READ ONLY transaction, the server itself then
    refuses anything but SELECT.  An existing role is refused when it is a
    superuser or has CREATEROLE / CREATEDB / REPLICATION / BYPASSRLS, is a
    member of a predefined role that reads server files or signals backends,
    owns objects in the database, or is the role running this command.  The
    role loses TEMP on the database and EXECUTE on the large-object and
    advisory-lock functions (revoked from PUBLIC, granted back to the running
    role), gets ``default_transaction_read_only`` and statement/lock timeouts,
    and SELECT on every archive table (and, by default privileges, on tables
    this role creates later).  Afterwards every privilege is checked, and any
    write privilege left (e.g. through membership in a writer role) aborts the
    whole change with an error naming it.
    """
    import re

    from archive.catalog.schema import load_schema
    from archive.errors import ArchiveError

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", role):
        raise ArchiveError(f"role name {role!r}: use lower-case letters, digits and _ (max 63)")
    done: list[str] = []
    engine = sa.create_engine(url)
    try:
        with engine.begin() as con:
            q = lambda sql, **kw: con.execute(sa.text(sql), kw)  # noqa: E731
            me = q("SELECT current_user").scalar()
            if role == me:
                raise ArchiveError(f"role {role!r} is the role running this command (the archive's owner); "
                                   "name another role")
            attrs = q(f"SELECT {', '.join(_PRIVILEGED_ATTRS)} FROM pg_roles WHERE rolname = :r", r=role).first()
            if attrs is not None:
                bad = [word for word, v in zip(_PRIVILEGED_ATTRS.values(), attrs) if v]
                if bad:
                    raise ArchiveError(f"role {role!r} has {', '.join(bad)}: refusing to call it read-only "
                                       "(use a new role name)")
                member = [p for p in _PRIVILEGED_ROLES
                          if q("SELECT pg_has_role(:r, :p, 'USAGE')", r=role, p=p).scalar()]
                if member:
                    raise ArchiveError(f"role {role!r} is a member of {', '.join(member)}: refusing to call it "
                                       "read-only (use a new role name)")
                owned = q("SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
                          "WHERE r.rolname = :r", r=role).scalar()
                if owned:
                    raise ArchiveError(f"role {role!r} owns {owned} tables or other relations here: an owner "
                                       "can grant itself any privilege; use a new role name")
            else:
                q(f'CREATE ROLE "{role}" LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS')
                done.append(f"created login role {role}")
            db = q("SELECT current_database()").scalar()
            q(f'GRANT CONNECT ON DATABASE "{db}" TO "{role}"')
            q(f'REVOKE CREATE, TEMPORARY ON DATABASE "{db}" FROM "{role}"')
            q(f'REVOKE TEMPORARY ON DATABASE "{db}" FROM PUBLIC')
            q(f'GRANT TEMPORARY ON DATABASE "{db}" TO "{me}"')
            q(f'GRANT USAGE ON SCHEMA public TO "{role}"')
            q(f'REVOKE CREATE ON SCHEMA public FROM "{role}"')
            done.append(f"CONNECT on {db}; TEMP revoked (from PUBLIC too, granted back to {me})")
            functions = q("SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n "
                          "ON n.oid = p.pronamespace WHERE p.proname ~ :pat AND n.nspname IN "
                          "('pg_catalog', 'public')", pat=_REVOKED_FUNCTIONS).scalars().all()
            for fn in functions:
                q(f'REVOKE EXECUTE ON FUNCTION {fn} FROM PUBLIC, "{role}"')
                q(f'GRANT EXECUTE ON FUNCTION {fn} TO "{me}"')
            done.append(f"EXECUTE revoked on {len(functions)} large-object / advisory-lock functions")
            tables = [t.name for t in load_schema()] + ["alembic_version"]
            for name in tables:
                q(f'REVOKE ALL ON "{name}" FROM "{role}"')
                q(f'GRANT SELECT ON "{name}" TO "{role}"')
            q(f'ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO "{role}"')
            done.append(f"SELECT on {len(tables)} tables")
            for setting, value in (("default_transaction_read_only", "on"), ("statement_timeout", "'5min'"),
                                   ("lock_timeout", "'10s'"), ("idle_in_transaction_session_timeout", "'1min'")):
                q(f'ALTER ROLE "{role}" IN DATABASE "{db}" SET {setting} = {value}')
            done.append("default_transaction_read_only, statement/lock/idle timeouts set")
            _check_read_only_role(q, role, db)
    finally:
        engine.dispose()
    return done


def _check_read_only_role(q, role: str, db: str) -> None:
    """Raise naming any privilege ``role`` still has beyond reading (the transaction then rolls back)."""
    from archive.errors import ArchiveError

    left = [f"{w} on table {t}" for t, w in q(
        "SELECT c.relname, string_agg(p.w, ', ') FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "CROSS JOIN unnest(ARRAY['INSERT','UPDATE','DELETE','TRUNCATE','REFERENCES','TRIGGER']) AS p(w) "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p', 'v', 'm') "
        "AND has_table_privilege(:r, c.oid, p.w) GROUP BY c.relname ORDER BY c.relname", r=role)]
    if q("SELECT has_database_privilege(:r, :d, 'TEMP')", r=role, d=db).scalar():
        left.append("TEMP on the database")
    if q("SELECT has_database_privilege(:r, :d, 'CREATE')", r=role, d=db).scalar():
        left.append("CREATE on the database")
    if q("SELECT has_schema_privilege(:r, 'public', 'CREATE')", r=role).scalar():
        left.append("CREATE on schema public")
    left += [f"EXECUTE on {fn}" for fn in q(
        "SELECT p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE p.proname ~ :pat AND n.nspname IN ('pg_catalog', 'public') "
        "AND has_function_privilege(:r, p.oid, 'EXECUTE')", pat=_REVOKED_FUNCTIONS, r=role).scalars()]
    if left:
        raise ArchiveError(f"role {role!r} would still have {'; '.join(left[:6])}"
                           f"{' and more' if len(left) > 6 else ''} (through a role it belongs to, or PUBLIC); "
                           "nothing changed")
