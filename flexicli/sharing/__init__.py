"""flexi push, flexi export and flexi import: the Hub upload, the stock-transformers export and its remote code, and
the import of released FlexiDepth checkpoints."""
