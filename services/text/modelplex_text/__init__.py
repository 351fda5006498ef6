"""Modelplex text backend: the TextGenerationService over a pluggable engine."""
