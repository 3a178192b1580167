"""The supervisor's exception tree; the admin API maps it to HTTP once (api.py)."""

from __future__ import annotations


class SupervisorError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidSpec(SupervisorError):
    status = 422
    type = "invalid_spec"


class ModelNotFound(SupervisorError):
    status = 404
    type = "model_not_found"


class ModelExists(SupervisorError):
    status = 409
    type = "conflict"


class Unauthorized(SupervisorError):
    status = 401
    type = "unauthorized"


class ConfirmationRequired(SupervisorError):
    """A call that would do something drastic (a reload removing every model) unconfirmed."""

    status = 409
    type = "confirmation_required"


class InvalidConfig(SupervisorError):
    """models.yaml does not parse or validate (the message names file, line and field)."""

    status = 422
    type = "invalid_config"


# -- the model cache (cache.py, hub.py): each failure of a download says what to do about it ----


class CacheError(SupervisorError):
    """A model could not be cached; `status` is the HTTP status the admin API answers with."""

    status = 502
    type = "download_failed"


class InvalidSource(CacheError):
    status = 400
    type = "invalid_source"


class RepoNotFound(CacheError):
    status = 404
    type = "repo_not_found"


class HubAccessDenied(CacheError):
    """Gated or private, and no token was sent (401); HubForbidden: the token has no access."""

    status = 401
    type = "access_denied"


class HubForbidden(HubAccessDenied):
    status = 403


class HubUnreachable(CacheError):
    status = 503
    type = "hub_unreachable"


class InsufficientDisk(CacheError):
    status = 507
    type = "insufficient_disk"


class CacheConflict(CacheError):
    status = 409
    type = "conflict"


class NotCached(CacheError):
    status = 404
    type = "not_cached"


class RevisionNotFound(CacheError):
    status = 404
    type = "revision_not_found"
