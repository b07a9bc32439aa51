"""Records: MLflow runs and loss history, the store and its check, the registry, the LoRA as an MLflow model."""
