"""Prefect flows: orchestration only, no logic."""
