"""flexi eval: the preservation verdict (KL, top-1, retention, yardstick) and the lm-evaluation-harness bridge."""
