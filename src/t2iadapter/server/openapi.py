"""OpenAPI for the endpoints that read JSON or multipart themselves: their request schemas and error responses."""
from __future__ import annotations

from typing import Any

from t2iadapter.server.schemas import ExtractRequest, GenerateRequest

REQUEST_MODELS = (GenerateRequest, ExtractRequest)
REF = "#/components/schemas/{model}"

GENERATE_MULTIPART = {
    "type": "object",
    "properties": {
        "request": {"type": "string", "description": "GenerateRequest as JSON (conditions may be left out)"},
        "condition.NAME": {"type": "string", "format": "binary", "description": "condition image for adapter NAME"},
    },
    "required": ["request"],
}
EXTRACT_MULTIPART = {
    "type": "object",
    "properties": {
        "extractor": {"type": "string"},
        "image": {"type": "string", "format": "binary"},
        "options": {"type": "string", "description": "the extractor's options as JSON"},
    },
    "required": ["extractor", "image"],
}
GENERATE_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "a token is set and the request lacks `Authorization: Bearer <token>`"},
    403: {"description": "no token is set and a browser sent the request from another site (`Origin`)"},
    404: {"description": "an adapter name that is not registered"},
    413: {"description": "the request body is larger than --max-upload-mb"},
    415: {"description": "the body is neither `application/json` nor `multipart/form-data`"},
    422: {"description": "invalid or out-of-bounds parameters (--max-steps, --max-side, --max-work...), with the reason"},
    429: {"description": "the queue is full; see Retry-After"},
    500: {"description": "a model worker failed on the request for a reason that is not the client's (it keeps serving)"},
    503: {"description": "no model worker is running (starting up, failed warm-up, or shutting down), or the "
                          "server lacks model weights the request needs (e.g. CLIP vision for a style adapter)"},
    504: {"description": "the request did not finish within --timeout"},
}


def body(model: str, *, multipart: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON body of `model` or the multipart form."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": REF.format(model=model)}},
        "multipart/form-data": {"schema": multipart},
    }}}


def install(app: Any) -> None:
    """Add the request models (and the models they use) to the app's OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in REQUEST_MODELS:
            spec = model.model_json_schema(ref_template=REF)
            components.update(spec.pop("$defs", {}))
            components[model.__name__] = spec
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
