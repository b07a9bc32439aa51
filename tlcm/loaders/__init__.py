"""Loading what stages read: teacher, LoRA, reward models, suite assets, prompts, hub ids, BAPPS, world prompts."""
