"""Modelplex catalog service."""
