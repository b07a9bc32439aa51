"""One module per pipeline stage; each exposes ``run(params, paths) -> dict`` (called by DVC and Prefect alike)."""
