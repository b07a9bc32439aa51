"""The synthetic shapes world: scenes and captions, the renderer, the tokenizer, the synthetic BAPPS."""
