"""Helpers the tests share (tests/ is on pytest's pythonpath)."""
