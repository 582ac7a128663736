"""Errors in OpenAI's wire shape: `{"error": {"message", "type", "param", "code"}}`.

`ApiError` is raised anywhere below the routes; the app's exception handlers turn it, an admission
`Rejection`, and FastAPI's own validation errors into that shape.
"""

from __future__ import annotations

import msgspec
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response

from gateway.admission.base import Rejection

_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """A request the gateway refuses or cannot serve; says why and (for bad input) which param."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        error_type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.headers = headers or {}


def invalid_param(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def error_body(message: str, error_type: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_response(error: ApiError) -> Response:
    body = _encoder.encode(error_body(error.message, error.error_type, error.param, error.code))
    return Response(body, error.status_code, error.headers, media_type="application/json")


def rejection_error(rejection: Rejection) -> ApiError:
    return ApiError(
        rejection.status_code,
        rejection.message,
        error_type=rejection.error_type,
        param=rejection.param,
        code=rejection.code,
        headers=rejection.headers,
    )


async def handle_validation_error(_request: Request, error: RequestValidationError) -> Response:
    """FastAPI's 422 becomes OpenAI's 400 naming the first offending param."""
    first = error.errors()[0] if error.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return error_response(
        ApiError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")
    )
