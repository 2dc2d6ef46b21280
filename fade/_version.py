"""The version of fade, defined here only: pyproject.toml and the CLIs read it."""

__version__ = "0.1.0"
