"""Build sam2serve engines from SAM 2 / SAM 2.1 checkpoints (needs the `export` extra: torch + Meta's sam2)."""
