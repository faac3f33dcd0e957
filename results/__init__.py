"""Collate transfer runs into the paper's tables, and plan/run suites of runs."""
