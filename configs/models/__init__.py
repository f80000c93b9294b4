"""Model presets (frozen target configs), beside the training presets of configs/*.py."""
