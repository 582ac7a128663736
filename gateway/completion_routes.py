"""POST /v1/chat/completions and /v1/completions as plain ASGI, in front of the FastAPI app.

    app.add_middleware(CompletionRoutes)   # everything else (models, admin, /metrics, /health) is FastAPI's

These two routes are the gateway's hot path: under load, FastAPI's router and request objects and
Starlette's streaming response cost more CPU than the completion itself. Here a request is: the bearer
key (cached tenant), the body (bounded), the completion service, its response; refusals are answered in
OpenAI's error shape and counted, as the app's exception handlers do for every other route.

Not being on FastAPI's router, they are not in its OpenAPI document either: `add_completion_routes_to`
writes them in (request bodies from the pydantic models, JSON and SSE answers, the error responses).
"""

from __future__ import annotations

from fastapi.responses import Response

from gateway.admission.base import Rejection
from gateway.auth import authenticate
from gateway.errors import ApiError, error_response, rejection_error
from gateway.metrics import GatewayMetrics
from gateway.runtime import GatewayRuntime
from gateway.schemas import (
    ChatCompletion,
    ChatCompletionBody,
    CompletionBody,
    OpenAIErrorResponse,
    SamplingFields,
    TextCompletion,
    parse_body,
)
from gateway.sse import ClientLeft

BODY_OF_PATH: dict[str, type[SamplingFields]] = {
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/completions": CompletionBody,
}


def refusal_response(metrics: GatewayMetrics, error: ApiError | Rejection) -> Response:
    """OpenAI's error shape for a refused request, counted by its code."""
    api_error = rejection_error(error) if isinstance(error, Rejection) else error
    metrics.rejections.labels(api_error.code or str(api_error.status_code)).inc()
    return error_response(api_error)


class RequestHeaders:
    """The few request headers the completion routes read, found in one pass over the ASGI headers."""

    __slots__ = ("authorization", "content_length", "idempotency_key")

    def __init__(self, raw_headers: list[tuple[bytes, bytes]]) -> None:
        self.authorization: str | None = None
        self.content_length: str | None = None
        self.idempotency_key: str | None = None
        for name, value in raw_headers:
            if name == b"authorization":
                self.authorization = value.decode("latin-1")
            elif name == b"content-length":
                self.content_length = value.decode("latin-1")
            elif name == b"idempotency-key":
                self.idempotency_key = value.decode("latin-1")


async def read_body(receive, headers: RequestHeaders, bytes_max: int) -> bytes:
    """The request body, refused with a 400 once it is longer than `bytes_max`."""
    too_large = ApiError(
        400, f"The request body is larger than {bytes_max} bytes.", param="body", code="body_too_large"
    )
    declared = headers.content_length
    if declared is not None and declared.isdigit() and int(declared) > bytes_max:
        raise too_large
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(
                400, "The client went away while sending the body.", param="body", code="client_disconnected"
            )
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > bytes_max:
            raise too_large
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


class CompletionRoutes:
    """ASGI middleware answering the completion routes itself and passing everything else on."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        body_model = BODY_OF_PATH.get(scope["path"]) if scope["type"] == "http" else None
        if body_model is None:
            await self.app(scope, receive, send)
            return
        runtime: GatewayRuntime = scope["app"].state.runtime
        if scope["method"] != "POST":
            error = ApiError(
                405,
                f"{scope['path']} accepts POST only",
                code="method_not_allowed",
                headers={"Allow": "POST"},
            )
            await refusal_response(runtime.metrics, error)(scope, receive, send)
            return
        try:
            response = await self._serve(runtime, scope, receive, body_model)
        except (ApiError, Rejection) as error:
            response = refusal_response(runtime.metrics, error)
        except ClientLeft:
            return  # nobody to answer: the generation was cancelled and settled
        await response(scope, receive, send)

    @staticmethod
    async def _serve(runtime: GatewayRuntime, scope, receive, body_model: type[SamplingFields]):
        headers = RequestHeaders(scope["headers"])
        tenant = await authenticate(runtime.key_cache, headers.authorization)
        raw = await read_body(receive, headers, runtime.settings.body_bytes_max)
        body = parse_body(body_model, raw)
        return await runtime.completions.serve(
            tenant, body, raw, scope["path"], headers.idempotency_key, receive
        )


# ---- OpenAPI ---------------------------------------------------------------------------------------

API_KEY_SCHEME = "ApiKey"
ERROR_STATUSES = {
    "400": "a malformed body, a param out of range or not supported (`param` names it)",
    "401": "a missing, unknown or revoked API key",
    "404": "a model not served here",
    "405": "a method other than POST",
    "409": "a request with this Idempotency-Key is still running",
    "429": "credit exhausted (insufficient_quota) or a rate limit (Retry-After)",
    "500": "the request failed in the inference engine",
    "502": "the inference worker failed",
    "503": "every worker is at capacity, or none is available (Retry-After)",
    "504": "the request ran past its time budget",
}
ROUTE_DOCS = {
    "/v1/chat/completions": (
        "create_chat_completion",
        "Create a chat completion",
        ChatCompletionBody,
        ChatCompletion,
    ),
    "/v1/completions": ("create_completion", "Create a completion", CompletionBody, TextCompletion),
}


def _schema_ref(schemas: dict, model: type, mode: str) -> dict:
    """Put `model`'s JSON schema (and its definitions) in `schemas`; a reference to it."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
    for name, definition in schema.pop("$defs", {}).items():
        schemas.setdefault(name, definition)
    schemas.setdefault(model.__name__, schema)
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def add_completion_routes_to(document: dict) -> dict:
    """`document` (FastAPI's OpenAPI dict) with the two completion routes added."""
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    components.setdefault("securitySchemes", {})[API_KEY_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "a tenant's API key (tg_...)",
    }
    error = _schema_ref(schemas, OpenAIErrorResponse, "serialization")
    for path, (operation_id, summary, body_model, answer_model) in ROUTE_DOCS.items():
        document.setdefault("paths", {})[path] = {
            "post": {
                "tags": ["openai"],
                "operationId": operation_id,
                "summary": summary,
                "security": [{API_KEY_SCHEME: []}],
                "parameters": [
                    {
                        "name": "Idempotency-Key",
                        "in": "header",
                        "required": False,
                        "description": "a repeat with the same key and body returns the stored answer, billed once",  # noqa: E501
                        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _schema_ref(schemas, body_model, "validation")}
                    },
                },
                "responses": {
                    "200": {
                        "description": "the completion: JSON, or server-sent events when `stream` is true",
                        "content": {
                            "application/json": {
                                "schema": _schema_ref(schemas, answer_model, "serialization")
                            },
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    **{
                        status: {
                            "description": description,
                            "content": {"application/json": {"schema": error}},
                        }
                        for status, description in ERROR_STATUSES.items()
                    },
                },
            }
        }
    return document
