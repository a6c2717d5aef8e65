"""Dialects: the API shapes Cascade speaks to clients and to providers."""
