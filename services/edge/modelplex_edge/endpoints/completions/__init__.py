"""POST /v1/completions (legacy)."""
