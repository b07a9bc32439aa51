"""Records: MLflow runs and loss history, the store and its check before work, the registry, the shipped LoRA as an MLflow model; imports tlcm.core and tlcm.loaders."""
