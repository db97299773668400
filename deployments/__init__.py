"""Shepherd Serve: LLM serving on Ray Serve. `build_app` is the serve_config.yaml entry point."""

from deployments.app import build_app

__all__ = ["build_app"]
