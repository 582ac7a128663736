"""The OpenAI-compatible routes: validate -> call the completion service -> answer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from gateway.deps import AuthenticatedTenant, Runtime, authenticated_tenant, gateway_runtime
from gateway.errors import ApiError
from gateway.schemas import ChatCompletionBody, CompletionBody, parse_body
from gateway.wire import encode_json

router = APIRouter(prefix="/v1", tags=["openai"])


async def read_body(request: Request, bytes_max: int) -> bytes:
    """The request body, refused with a 400 once it is longer than `bytes_max`."""
    too_large = ApiError(400, f"The request body is larger than {bytes_max} bytes.", param="body", code="body_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > bytes_max:
        raise too_large
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > bytes_max:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "The client went away while sending the body.", param="body", code="client_disconnected") from None
    return b"".join(chunks)


# The two completion routes resolve their runtime and tenant by direct calls rather than through
# FastAPI's dependency solver: it is the same code (gateway.deps), without the solver's per-request cost
# on the hot path.


@router.post("/chat/completions", response_model=None)
async def chat_completions(request: Request) -> Response:
    runtime = gateway_runtime(request)
    tenant = await authenticated_tenant(request, runtime)
    raw = await read_body(request, runtime.settings.body_bytes_max)
    body = parse_body(ChatCompletionBody, raw)
    return await runtime.completions.serve(request, tenant, body, raw)


@router.post("/completions", response_model=None)
async def completions(request: Request) -> Response:
    runtime = gateway_runtime(request)
    tenant = await authenticated_tenant(request, runtime)
    raw = await read_body(request, runtime.settings.body_bytes_max)
    body = parse_body(CompletionBody, raw)
    return await runtime.completions.serve(request, tenant, body, raw)


def model_card(model: str, owned_by: str) -> dict:
    return {"id": model, "object": "model", "created": 0, "owned_by": owned_by}


@router.get("/models", response_model=None)
async def list_models(_tenant: AuthenticatedTenant, runtime: Runtime) -> Response:
    cards = [model_card(model, limits.owned_by) for model, limits in runtime.settings.models.items()]
    return Response(encode_json({"object": "list", "data": cards}), media_type="application/json")


@router.get("/models/{model}", response_model=None)
async def get_model(model: str, _tenant: AuthenticatedTenant, runtime: Runtime) -> Response:
    limits = runtime.settings.models.get(model)
    if limits is None:
        raise ApiError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")
    return Response(encode_json(model_card(model, limits.owned_by)), media_type="application/json")
