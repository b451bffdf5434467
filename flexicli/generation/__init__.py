"""flexi generate and flexi patterns: decoding with per-token layer counts, and the layer-usage analysis and its
report."""
