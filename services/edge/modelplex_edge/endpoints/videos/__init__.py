"""OpenAI's video API: /v1/videos (create, list, retrieve, delete, remix, content) and /v1/videos/generations."""
