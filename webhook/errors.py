"""The webhook's own exceptions, mapped to responses at the boundary (app.py, cli.py).

::

    ModelCacheWebhookError
    ├── MalformedReview   the request is not a well-formed AdmissionReview v1      -> HTTP 400
    ├── Denied            a policy decision: the object is refused, with a message  -> 200, allowed: false
    └── ConfigError       settings that cannot work; raised at start-up only         -> the process exits

Anything else escaping the admission functions is a bug: the app logs it and answers 500. The admission core is
property-tested never to raise anything but ``MalformedReview`` for any client input.
"""

from __future__ import annotations


class ModelCacheWebhookError(Exception):
    """Base of every error the webhook raises on purpose."""


class MalformedReview(ModelCacheWebhookError):
    """The body is not an AdmissionReview v1 we can answer. The message says which field is wrong."""


class Denied(ModelCacheWebhookError):
    """The object is refused. The message names the annotation, the bad value and the fix; it is shown by kubectl."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ModelCacheWebhookError):
    """Settings that cannot work (bad quantity, bad image reference, ...). Raised while starting, never per request."""
