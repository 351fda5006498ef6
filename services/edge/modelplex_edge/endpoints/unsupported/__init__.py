"""Endpoints Modelplex does not offer: a 404 that says what to use instead."""
