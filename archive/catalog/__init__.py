"""The catalog store: schema, Parquet and Postgres backends, HEALPix queries, association."""
