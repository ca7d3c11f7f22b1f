"""Names users choose from, kept free of torch so the CLI and runtime import fast and lean."""

VARIANTS = ("butterfly", "dense", "ternary", "static")
EXPERT_FORMS = ("paper", "ffn")
PRESET_NAMES = ("tiny", "paper")
