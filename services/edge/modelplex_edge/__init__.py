"""Modelplex edge: the public OpenAI-compatible HTTP API."""
