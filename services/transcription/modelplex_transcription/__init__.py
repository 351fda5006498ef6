"""Modelplex transcription backend: TranscriptionService (speech to text)."""
