"""Runnable examples (`python -m examples.<name>` from the repository root); not part of the package."""
