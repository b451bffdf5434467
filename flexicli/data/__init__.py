"""Shared text: the built-in prompts, held-out text, training text and packing (text.py), the task suite (tasks.py),
and prompt -> token ids (tokens.py)."""
