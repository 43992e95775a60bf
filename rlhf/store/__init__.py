"""The feedback database (docs/design.md, "Feedback store"): documents people submit,
comparisons of two policy summaries, and their choices, read back as canonical training tables.
"""

from rlhf.store.connection import check_url, redact_url
from rlhf.store.cycles import Cycle, CycleLog, CycleRecord, CycleStage, GuardReport, PPOSummary, SummaryStats
from rlhf.store.dataset import feedback_dataset
from rlhf.store.errors import AlreadyDecidedError, InvalidFeedbackError, NotFoundError, StoreInputError
from rlhf.store.feedback import Comparison, FeedbackStore

__all__ = [
    "AlreadyDecidedError",
    "Comparison",
    "Cycle",
    "CycleLog",
    "CycleRecord",
    "CycleStage",
    "FeedbackStore",
    "GuardReport",
    "InvalidFeedbackError",
    "NotFoundError",
    "PPOSummary",
    "StoreInputError",
    "SummaryStats",
    "check_url",
    "feedback_dataset",
    "redact_url",
]
