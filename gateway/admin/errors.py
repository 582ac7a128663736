"""Admin API errors: every 4xx body is {"detail": {"field": ..., "message": ...}}, the message naming
the field. Validation errors from FastAPI are rewritten into that shape by `AdminRoute`."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import HTTPException, Request, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

REQUEST_PARTS = ("body", "query", "path", "header", "cookie")
# The request.state attribute holding the audit log's hook (gateway.admin.audit_log.record_action, bound by
# build_admin_router): called with every successful response, it records what changed and who changed it.
AUDIT_HOOK_STATE = "admin_audit"


class ErrorDetail(BaseModel):
    field: str | None = Field(
        description="the request field at fault (body, a JSON field, a header, a parameter)"
    )
    message: str = Field(description="what is wrong, starting with the field's name")


class ErrorBody(BaseModel):
    detail: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "malformed JSON"},
    401: {"model": ErrorBody, "description": "missing or wrong admin token"},
    404: {"model": ErrorBody, "description": "unknown tenant, key or grant"},
    422: {"model": ErrorBody, "description": "a field is invalid; `detail.field` names it"},
}


class AdminError(HTTPException):
    def __init__(
        self, status_code: int, field: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(
            status_code, detail={"field": field, "message": f"{field}: {message}"}, headers=headers
        )


def field_of(location: tuple[Any, ...]) -> str:
    """`("body", "amount")` -> "amount"; `("header", "idempotency-key")` -> "Idempotency-Key"."""
    parts = list(location)
    part = parts.pop(0) if parts and parts[0] in REQUEST_PARTS else None
    if part == "header" and parts:
        return "-".join(word.capitalize() for word in str(parts[0]).split("-"))
    if not parts:
        return part or "request"
    return ".".join(str(item) for item in parts)


def validation_error_response(error: RequestValidationError) -> JSONResponse:
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        detail = {
            "field": "body",
            "message": f"body: malformed JSON ({first.get('ctx', {}).get('error', 'invalid')})",
        }
        return JSONResponse({"detail": detail}, status_code=status.HTTP_400_BAD_REQUEST)
    field = field_of(tuple(first.get("loc", ())))
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        message = "is required"
    detail = {"field": field, "message": f"{field}: {message}"}
    return JSONResponse({"detail": detail}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT)


class AdminRoute(APIRoute):
    """Routes whose request validation errors name the offending field in one short message, and whose
    successful changes go to the admin audit log (the hook at AUDIT_HOOK_STATE)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                response = await handler(request)
            except RequestValidationError as error:
                return validation_error_response(error)
            except StarletteHTTPException as error:  # FastAPI raises Starlette's for an unreadable body
                if not isinstance(error.detail, str):
                    raise  # an AdminError: already in the admin shape
                # FastAPI's own refusals (a body it cannot read at all): the same shape as every other error
                detail = {"field": "body", "message": f"body: {error.detail}"}
                return JSONResponse({"detail": detail}, status_code=error.status_code, headers=error.headers)
            hook = getattr(request.state, AUDIT_HOOK_STATE, None)
            if hook is not None:
                await hook(request, response)
            return response

        return handle
