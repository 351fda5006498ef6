"""Modelplex speech backend: SpeechService (text to speech)."""
