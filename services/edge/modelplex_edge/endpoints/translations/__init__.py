"""POST /v1/audio/translations (multipart): transcribe, then translate into English."""
