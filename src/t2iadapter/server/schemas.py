"""Request and response bodies of the HTTP API (pydantic models; they are the OpenAPI schema)."""
from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from t2iadapter.generation import request as gen

DEFAULTS = gen.defaults()  # every default below comes from GenerationRequest / AdapterUse
USE = gen.use_defaults()


def not_bool(value: Any) -> Any:
    """JSON true/false is not a number here (pydantic would read it as 1/0), as in GenerationRequest."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


class AdapterOptions(BaseModel):
    """How one registered adapter acts: its weight and the fraction of the steps it is active in."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(USE["weight"], ge=-10.0, le=10.0, allow_inf_nan=False,
                          description="feature scale (paper §3.3 uses 0..1; >1 strengthens)")
    window: str | tuple[float, float] = Field(str(USE["window"]),
                                              description="START:END fraction of the steps, e.g. '0:0.5' or [0, 0.5]")

    _numbers = field_validator("weight", mode="before")(not_bool)


class GenerateRequest(BaseModel):
    """One text-to-image call. Conditions are keyed by registered adapter name; an adapter without a condition does not act."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(..., min_length=1, max_length=2000)
    negative_prompt: str | None = Field(None, max_length=2000)
    conditions: dict[str, str] = Field(
        default_factory=dict, description="adapter name → base64 image (PNG/JPEG/WebP; a data: URL prefix is accepted)"
    )
    adapters: dict[str, AdapterOptions] = Field(default_factory=dict, description="adapter name → weight and window")
    seed: int | None = Field(None, ge=gen.SEED_RANGE[0], lt=gen.SEED_RANGE[1],
                             description="default: random, returned in the parameters")
    steps: int = Field(DEFAULTS["steps"], ge=1, le=gen.MAX_STEPS)
    guidance_scale: float = Field(DEFAULTS["guidance_scale"], ge=gen.GUIDANCE_RANGE[0], le=gen.GUIDANCE_RANGE[1],
                                  allow_inf_nan=False)
    width: int | None = Field(None, ge=8, description="default: the base model's size")
    height: int | None = Field(None, ge=8)
    scheduler: str | None = Field(DEFAULTS["scheduler"], description="one of GET /v1/models → schedulers; default: the base's")
    compose: Literal[gen.COMPOSE_MODES] = DEFAULTS["compose"]  # type: ignore[valid-type]
    fuser_windows: Literal[gen.FUSER_WINDOW_MODES] = Field(  # type: ignore[valid-type]
        DEFAULTS["fuser_windows"], description="with compose=fuser: 'once' (fuse all conditions once, gate by window; "
        "the original CoAdapter) or 'active' (fuse the adapters active at each step)")
    num_images: int = Field(DEFAULTS["num_images"], ge=1)
    eta: float = Field(DEFAULTS["eta"], ge=0.0, le=1.0, allow_inf_nan=False,
                       description="DDIM's eta (noise added back each step) or TCD's gamma; other schedulers take 0")
    # --- img2img / inpainting (issue 15) ---
    init_image: str | None = Field(None, description="img2img: base64 image to start from (default size: its own)")
    strength: float | None = Field(DEFAULTS["strength"], gt=0.0, le=1.0, allow_inf_nan=False,
                                   description="with init_image: noise level to start from; default 0.8, 1.0 with a mask")
    mask_image: str | None = Field(None, description="inpainting: base64 mask of init_image's size, white = repaint")
    paste_back: bool = Field(DEFAULTS["paste_back"], description="inpainting: put the kept pixels back exactly")
    # --- ControlNets (issue 16): their conditions go in `conditions` under the registered ControlNet's name ---
    controlnets: dict[str, AdapterOptions] = Field(
        default_factory=dict, description="ControlNet name → weight (controlnet_conditioning_scale) and window")

    _numbers = field_validator("seed", "steps", "guidance_scale", "width", "height", "num_images", "strength", "eta",
                               mode="before")(not_bool)


class ImageOut(BaseModel):
    png: str = Field(..., description="base64 PNG; its `t2iadapter` text chunk holds the parameters")
    width: int
    height: int


class GenerateResponse(BaseModel):
    images: list[ImageOut]
    parameters: dict[str, Any]
    seconds: float = Field(..., description="time on the model")
    queued_seconds: float


class JobOut(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled", "timeout"]
    progress: float = Field(..., description="fraction of the denoising steps done")
    position: int = Field(..., description="place in the queue (1 = next); 0 when running or finished")
    error: str | None = None
    result: GenerateResponse | None = None


class ExtractRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    extractor: str = Field(..., description="one of GET /v1/models → extractors")
    image: str = Field(..., description="base64 image (a data: URL prefix is accepted)")
    options: dict[str, int | float | bool | str] = Field(default_factory=dict, description="the extractor's options")


class ExtractResponse(BaseModel):
    extractor: str
    png: str
    width: int
    height: int
    channels: int


class AdapterInfo(BaseModel):
    name: str
    kind: str
    channels: int | None = Field(None, description="condition channels: 1 (white on black) or 3 (RGB)")


class ExtractorInfo(BaseModel):
    name: str
    channels: int
    feeds: list[str]
    needs_weights: bool
    recipe: str
    options: dict[str, Any]


class ModelsResponse(BaseModel):
    base: str
    adapters: list[AdapterInfo]
    fuser: bool
    controlnets: list[str] = Field(default_factory=list, description="registered ControlNets (conditions by these names)")
    extractors: list[ExtractorInfo]
    schedulers: list[str]
    default_size: tuple[int, int]
    size_multiple: int
    limits: dict[str, float | int]
    defaults: dict[str, Any] = Field(..., description="GenerationRequest defaults (steps, guidance_scale, ...): what "
                                     "a request that leaves a field out gets; the web page shows them")


class WorkerInfo(BaseModel):
    name: str = Field(..., description="the worker's device, e.g. cuda:0 (cpu#1 for a second one on a device)")
    status: Literal["starting", "up", "failed", "stopped"]
    jobs: int = Field(..., description="jobs finished")
    failures: int = Field(..., description="batches that failed for a reason not the client's")


class Health(BaseModel):
    status: str = Field(..., description="ok (a worker is up), starting (warming up) or down")
    waiting: int
    running: int
    capacity: int
    workers: list[WorkerInfo] = Field(default_factory=list)


# ------------------------------------------------------------------ pydantic's reasons → one line for the client

TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}
MSG_PREFIXES = ("Value error, ", "Input ", "String ", "Tuple ", "List ", "Dictionary ")


def explain(exc: ValidationError, model: type[BaseModel], what: str = "the body") -> str:
    """A 422 `detail`: each field pydantic refused and what it takes, in one line (`what` names the JSON's source)."""
    problems: dict[str, str] = {}
    unions: dict[str, list[str]] = {}  # a field of several types: the members pydantic tried, all refused
    extra: dict[str, list[str]] = {}  # an object's fields that its model does not have
    for err in exc.errors(include_url=False, include_input=False):
        path, parent, info, union = _walk(model, err["loc"])
        name = ".".join(path)
        if union:
            unions.setdefault(name, []).extend(union)
            kinds = list(dict.fromkeys(TYPE_WORDS.get(t, "a list" if t.startswith(("tuple", "list")) else t)
                                       for t in unions[name]))
            kinds = " or ".join(kinds) if len(kinds) < 3 else ", ".join(kinds[:-1]) + " or " + kinds[-1]
            problems[name] = f"{name} must be {kinds}" + (f" ({info.description})" if info and info.description else "")
        elif err["type"] == "json_invalid":
            reason = err.get("ctx", {}).get("error", err["msg"])
            problems[name] = f"{what} is not valid JSON ({reason}); send one object"
        elif not path:
            problems[name] = f"{what} must be a JSON object with the fields of {model.__name__} (see GET /docs)"
        elif err["type"] == "missing":
            problems[name] = f"{name} is required"
        elif err["type"] == "extra_forbidden":  # one entry for all the unknown fields of one object
            key = ".".join(path[:-1]) + ".*"
            extra.setdefault(key, []).append(repr(name))
            known = f"the fields here are: {', '.join(parent.model_fields)}" if parent else "see GET /docs"
            problems[key] = f"unknown field{'s' if len(extra[key]) > 1 else ''} {', '.join(extra[key])}; {known}"
        else:
            msg = err["msg"]
            for prefix in MSG_PREFIXES:
                msg = msg.removeprefix(prefix)
            problems.setdefault(name, f"{name} {msg}" if msg.startswith(("should ", "must ")) else
                                f"{name}: {msg[:1].lower()}{msg[1:]}")
    shown = list(problems.values())
    more = f" (and {len(shown) - 3} more)" if len(shown) > 3 else ""
    return "; ".join(shown[:3]) + more


def _walk(model: type[BaseModel], loc: tuple) -> tuple[list[str], type[BaseModel] | None, Any, list[str]]:
    """A pydantic error location → (the field path a client wrote, the model holding its last part, that field's
    FieldInfo, the union members pydantic tried); union member names are not part of the path."""
    path: list[str] = []
    ann: Any = model
    parent, info, union = None, None, []
    for part in loc:
        origin = typing.get_origin(ann)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            parent, info = ann, ann.model_fields.get(str(part))
            ann = info.annotation if info else None
        elif origin in (typing.Union, types.UnionType):
            union.append(str(part))  # what follows is inside that member
            break
        elif origin is dict:
            ann, info = typing.get_args(ann)[1], None
        else:
            ann = None
        path.append(str(part))
    return path, parent, info, union
