"""Reading a database's schema back, to compare a migrated database with a new one."""

from __future__ import annotations

import sqlalchemy as sa


def schema_of(engine: sa.Engine) -> dict[str, dict]:
    """Every table's columns, keys, indexes and constraints, as the database reports them."""
    inspector = sa.inspect(engine)
    return {
        table: {
            "columns": [(column["name"], str(column["type"]), column["nullable"])
                        for column in inspector.get_columns(table)],
            "primary_key": inspector.get_pk_constraint(table),
            "foreign_keys": inspector.get_foreign_keys(table),
            "indexes": sorted(inspector.get_indexes(table), key=lambda index: index["name"]),
            "unique": inspector.get_unique_constraints(table),
            "checks": inspector.get_check_constraints(table),
        }
        for table in inspector.get_table_names()
    }
