"""Modelplex embeddings backend: EmbeddingsService over a pluggable engine."""
