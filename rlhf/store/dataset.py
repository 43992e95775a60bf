"""The feedback store as a Ray Data source, the distributed twin of FeedbackStore's tables."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from rlhf.data.schemas import Schema
from rlhf.store.connection import create_engine
from rlhf.store.feedback import FeedbackStore
from rlhf.store.queries import canonical_query

if TYPE_CHECKING:
    import ray.data


@dataclass(frozen=True)
class _Connect:
    """A picklable DB-API connection factory for read tasks; built on the store's engine hooks so
    SQLite readers get the same pragmas (busy_timeout) as writers."""

    url: sa.URL

    def __call__(self) -> Any:
        return create_engine(self.url, poolclass=NullPool).raw_connection()


def _cast(batch: pa.Table, schema: pa.Schema) -> pa.Table:
    """Give read_sql's inferred types (null-typed columns when empty) the canonical schema."""
    return batch.cast(schema)


def feedback_dataset(url: str, kind: Schema, since: datetime | None = None) -> ray.data.Dataset:
    """Decided comparisons (PREFERENCE) or documents (PROMPTS) recorded after ``since``, in the
    canonical schema and the same order as ``FeedbackStore.comparisons_table``/``documents_table``.

    The URL is expanded here, on the driver, so workers need neither the secret's environment
    variable nor the driver's working directory. The values are rendered into the SQL (they are
    typed datetimes, never user text) because DB-API drivers disagree on parameter syntax. One
    read task making one block: feedback tables are small, read_sql's sharding needs MD5, which
    SQLite lacks, and Ray Data splits one task's output into as many blocks as it guesses the
    cluster wants (200 on 2 CPUs), which the map below may then return out of order. With no
    matching rows the dataset is empty and its ``schema()`` is None (Ray drops empty blocks).
    """
    import ray.data  # deferred: only this function of rlhf.store needs Ray

    store = FeedbackStore(url)  # creates the tables on a new database, so the read cannot fail on them
    engine = store.engine
    query = canonical_query(kind, since)
    sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    store.close()
    dataset = ray.data.read_sql(sql, _Connect(engine.url), override_num_blocks=1)
    return dataset.map_batches(partial(_cast, schema=kind.arrow), batch_format="pyarrow", batch_size=None)
