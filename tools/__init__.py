"""Commands that run stage code outside the pipeline: `tlcm plan`, `tlcm check-gpu`, `tlcm export`, the preflight."""
