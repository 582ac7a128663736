"""The OpenAI-compatible model routes. The completion routes, the hot path, are plain ASGI in front of the
app (gateway.completion_routes)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from gateway.deps import AuthenticatedTenant, Runtime
from gateway.errors import ApiError
from gateway.wire import encode_json

router = APIRouter(prefix="/v1", tags=["openai"])


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
