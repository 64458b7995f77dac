"""Shared library of the submitd services."""
