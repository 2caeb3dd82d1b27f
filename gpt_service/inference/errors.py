"""Serving errors, importable without torch so the HTTP layer can map them to status codes."""

from gpt_service.errors import UserError


class ModelNotLoaded(UserError):
    """A model name that is not loaded (404)."""


class ModelExists(UserError):
    """A model name that is already taken (409)."""


class AdapterMismatch(UserError):
    """An adapter trained on another base model, or a folder that is not a loadable adapter (400)."""


class ContextTooLong(UserError):
    """Prompt plus max_tokens longer than the model's context (400)."""


class QueueFull(UserError):
    """More requests wait than the engine accepts (429, with Retry-After)."""


class BackendConflict(UserError):
    """A base model's serving process already runs with other engine options (409)."""


class BackendUnavailable(UserError):
    """A serving process (vLLM) that is not there: it never came up, or it died (503)."""
