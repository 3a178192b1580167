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


class InvalidConfig(SupervisorError):
    """models.yaml does not parse or validate (the message names file, line and field)."""

    status = 422
    type = "invalid_config"
