"""The feedback database (DESIGN.md, "Serving and the feedback loop"): documents people submit,
comparisons of two policy summaries, and their choices, read back as canonical training tables.
"""

from rlhf.store.cycles import Cycle, CycleLog
from rlhf.store.dataset import feedback_dataset
from rlhf.store.errors import AlreadyDecidedError, InvalidFeedbackError, NotFoundError, StoreInputError
from rlhf.store.feedback import Comparison, FeedbackStore

__all__ = [
    "AlreadyDecidedError",
    "Comparison",
    "Cycle",
    "CycleLog",
    "FeedbackStore",
    "InvalidFeedbackError",
    "NotFoundError",
    "StoreInputError",
    "feedback_dataset",
]
