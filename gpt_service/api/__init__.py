"""The HTTP layer. It never imports torch: engines are reached through app state."""

from gpt_service.api.app import create_app

__all__ = ["create_app"]
