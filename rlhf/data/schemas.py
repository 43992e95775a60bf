"""The three canonical tables every training stage reads (docs/design.md, "Data flow and packages").

Adapters in :mod:`rlhf.data.sources` map real layouts onto these, so SFT, reward and PPO code
only ever sees these column names and types.
"""

from __future__ import annotations

import enum

import pyarrow as pa


def _required(name: str, type_: pa.DataType) -> pa.Field:
    """A column every row has; adapters skip rows that lack it, so nulls never reach training."""
    return pa.field(name, type_, nullable=False)


SFT_SCHEMA = pa.schema([_required("original_text", pa.string()), _required("summary", pa.string())])

# choice is the index (0 or 1) of the preferred summary. int64 rather than int8 so tables built
# elsewhere (e.g. rlhf.data.augment) concatenate without a cast. source, policy_0 and policy_1
# are always present as columns but may be null: not every source records them. source is free
# text saying where the pair came from: "post" (Reddit TL;DR) or "article" (CNN/DM) for
# summarize_from_feedback rows, a flat file's own `source` column, "synthetic:<kind>" from augment.
PREFERENCE_SCHEMA = pa.schema(
    [
        _required("original_text", pa.string()),
        _required("summary_0", pa.string()),
        _required("summary_1", pa.string()),
        _required("choice", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("policy_0", pa.string()),
        pa.field("policy_1", pa.string()),
    ]
)

PROMPTS_SCHEMA = pa.schema([_required("original_text", pa.string())])


class Schema(str, enum.Enum):
    """Which canonical table a source is loaded as; the value is the name used on the CLI."""

    SFT = "sft"
    PREFERENCE = "preference"
    PROMPTS = "prompts"

    @property
    def arrow(self) -> pa.Schema:
        """The Arrow schema of this table."""
        return _ARROW[self]

    @property
    def summary_columns(self) -> tuple[str, ...]:
        """Summary columns, which must be non-empty (and, for preferences, differ)."""
        return _SUMMARIES[self]

    @property
    def text_columns(self) -> tuple[str, ...]:
        """Columns a model reads as text: the ones whose token lengths matter."""
        return ("original_text", *self.summary_columns)


_ARROW = {Schema.SFT: SFT_SCHEMA, Schema.PREFERENCE: PREFERENCE_SCHEMA, Schema.PROMPTS: PROMPTS_SCHEMA}
_SUMMARIES = {
    Schema.SFT: ("summary",),
    Schema.PREFERENCE: ("summary_0", "summary_1"),
    Schema.PROMPTS: (),
}
