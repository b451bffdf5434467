"""The core every stage uses: the families table, the skip units, the router/adapter and the routed layer, the sparse
attention path, FlexiModel, the checkpoint and its card, base-model loading and the Hub."""

# the checkpoint folder every verb writes or reads when not told otherwise; here, not in checkpoint.py, because the
# CLI's option defaults need it without importing torch
DEFAULT_DIR = "flexi-model"
