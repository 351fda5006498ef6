"""Free loopback ports for test servers (the launcher's own helper)."""

from modelplex_kit.devstack import free_port

__all__ = ["free_port"]
