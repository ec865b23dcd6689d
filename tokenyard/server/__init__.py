"""The OpenAI-compatible HTTP server (FastAPI + uvicorn)."""

from tokenyard.server.app import ServerSettings, create_app

__all__ = ["ServerSettings", "create_app"]
