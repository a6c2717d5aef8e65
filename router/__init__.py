"""Cascade: an LLM API gateway that cascades each request across providers within one deadline."""

__version__ = "0.1.0"
