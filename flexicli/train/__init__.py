"""flexi train: the config and recipes, the teacher (the same model with routing off), the objectives and budgets, the
warm starts, threshold calibration, resumable training state, and the loop."""
