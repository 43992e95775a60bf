"""Ray-distributed RLHF for summarization."""

__version__ = "0.1.0"
