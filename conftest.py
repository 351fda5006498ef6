"""Loaded by pytest before any test module (and so before grpc is imported): see modelplex_kit/__init__.py
for why gRPC's fork support is off in processes that spawn children."""

import modelplex_kit  # noqa: F401
