"""OpenAI wire models (pydantic). They import no engine or gRPC code."""
