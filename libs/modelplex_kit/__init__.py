"""Shared kit for Modelplex services.

Everything a service needs besides its own logic: typed settings from the
environment, the gRPC server bootstrap, logging, telemetry and the one table
that maps gRPC status codes to OpenAI errors.
"""
