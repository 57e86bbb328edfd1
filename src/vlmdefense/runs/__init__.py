"""Runs: profiles, the papermill runner and its staleness, result records and provenance."""
