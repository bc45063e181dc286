"""Models: one per file, each exposing `Model` and `load()` (big_vision style)."""
