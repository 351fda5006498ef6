"""Modelplex videos backend."""
