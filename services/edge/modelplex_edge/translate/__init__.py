"""OpenAI wire models <-> internal protobuf contracts (to_proto / from_proto)."""
