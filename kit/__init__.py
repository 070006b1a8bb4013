"""Survival Kit: a local LLM on a USB stick, verified and offline."""

__version__ = "0.1.0"
