"""Data loading: real sources (files, hub datasets) into the canonical Arrow tables.

Ray, ``datasets`` and the PDF extractor are imported only by the functions that use them.
"""

from pathlib import Path

from rlhf.config.sections import DataSourceConfig
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

# The small real samples the tiny defaults train on (shipped with the package).
SAMPLES_DIR = Path(__file__).parent / "samples"


def sample_source(name: str) -> DataSourceConfig:
    """A data section reading the shipped sample file ``name`` (the tiny defaults' data)."""
    return DataSourceConfig(path=str(SAMPLES_DIR / name))


__all__ = [
    "SAMPLES_DIR",
    "sample_source",
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
