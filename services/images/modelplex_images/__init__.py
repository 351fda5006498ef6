"""Modelplex images backend."""
