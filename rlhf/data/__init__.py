"""Data loading: real sources (files, hub datasets) into the canonical Arrow tables.

Ray, ``datasets`` and the PDF extractor are imported only by the functions that use them.
"""

from rlhf.data.schemas import PREFERENCE_SCHEMA, PROMPTS_SCHEMA, SFT_SCHEMA, Schema
from rlhf.data.sources import (
    LAYOUTS,
    DataError,
    DataWarning,
    Layout,
    LoadResult,
    SkippedRow,
    SkipReason,
    SkipReport,
    detect_layout,
    load_source,
    read_dataset,
    to_ray_dataset,
)

__all__ = [
    "LAYOUTS",
    "PREFERENCE_SCHEMA",
    "PROMPTS_SCHEMA",
    "SFT_SCHEMA",
    "DataError",
    "DataWarning",
    "Layout",
    "LoadResult",
    "Schema",
    "SkipReason",
    "SkipReport",
    "SkippedRow",
    "detect_layout",
    "load_source",
    "read_dataset",
    "to_ray_dataset",
]
