"""The API's request bodies as pydantic models: the one schema that checks every request
(`validate`, used by api.py and admin.py) and that /openapi.json is built from (openapi.py).

Strict, as OpenAI is: a number is a JSON number (not a string, not a boolean, and finite), an
unknown field is refused ("Unrecognized request argument supplied"), and a field OpenAI has that
this cluster does not do (tools, JSON mode, several choices, penalties) is a 400 that names it,
never accepted and silently ignored. The few OpenAI fields that change nothing in the answer
(`user`, `metadata`, `store`, `service_tier`) are accepted and ignored, as OpenAI's own server
ignores them for generation.

Each field's `description` completes the sentence "'<field>' must be ...", so an error says
what a field takes in the same words the OpenAPI document does.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from appliance.bus.protocol import TOP_LOGPROBS

UNSUPPORTED = "x-exo-unsupported"   # a field's json_schema_extra key: why the cluster refuses it


def _range(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f"of at least {lo}" if lo is not None else f"of at most {hi}"


def integer(lo: int | None = None, hi: int | None = None):
    return Annotated[int, Field(ge=lo, le=hi, description=f"an integer {_range(lo, hi)}")]


def number(lo: float, hi: float):
    return Annotated[float, Field(ge=lo, le=hi, allow_inf_nan=False, description=f"a finite number {_range(lo, hi)}")]


def unsupported(why: str, default: Any = None):
    """A field OpenAI has and this cluster refuses unless it has its do-nothing value."""
    return Field(default, description=f"not supported ({why})", json_schema_extra={UNSUPPORTED: why})


Text = Annotated[str, Field(min_length=1)]
Stop = Annotated[Text | Annotated[list[Text], Field(max_length=4)] | None,
                 Field(description="a string or a list of up to 4 non-empty strings")]
Zero = Annotated[float, Field(ge=0, le=0)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(Strict):
    include_usage: Annotated[bool, Field(description="a boolean")] = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None      # who spoke, in OpenAI's API; templates do not use it


class ResponseFormat(Strict):
    type: Literal["text"]


class ChatTemplateKwargs(Strict):
    """The switches a chat template reads, as vLLM takes them."""
    enable_thinking: Annotated[bool | None, Field(description="a boolean")] = None


class Sampled(Strict):
    """What both endpoints take."""
    model: Annotated[str, Field(description="a string: the id of the model served (GET /v1/models)")]
    max_tokens: integer(1) | None = None
    temperature: number(0, 2) | None = None
    top_p: number(0, 1) | None = None
    top_k: integer(0, 2**31 - 1) | None = None
    seed: integer(0, 2**63 - 1) | None = None
    stop: Stop = None
    stream: Annotated[bool | None, Field(description="a boolean")] = False
    stream_options: Annotated[StreamOptions | None, Field(description="an object {\"include_usage\": boolean}")] = None
    n: Annotated[int | None, Field(ge=1, le=1)] = unsupported("one choice per request: n must be 1")
    frequency_penalty: Zero | None = unsupported("no penalties: it must be 0")
    presence_penalty: Zero | None = unsupported("no penalties: it must be 0")
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = unsupported("no logit bias")
    user: str | None = None                  # for OpenAI's abuse tracking: accepted, unused
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None


class CompletionRequest(Sampled):
    prompt: Annotated[str | Annotated[list[str], Field(min_length=1, max_length=1)],
                      Field(description="a string (or a list of one string)")] = ""
    logprobs: integer(0, TOP_LOGPROBS) | None = None
    echo: Literal[False] | None = unsupported("the prompt is not echoed")
    best_of: Annotated[int | None, Field(ge=1, le=1)] = unsupported("one candidate per request")
    suffix: None = unsupported("no insertion")


class ChatCompletionRequest(Sampled):
    messages: Annotated[list[Message], Field(
        min_length=1, description="a non-empty list of messages, each {role: system, developer, user or assistant, "
                                  "content: a string or a list of {type: text, text}}")]
    max_completion_tokens: integer(1) | None = None
    logprobs: Annotated[bool | None, Field(description="a boolean")] = None
    top_logprobs: integer(0, TOP_LOGPROBS) | None = None
    enable_thinking: Annotated[bool | None, Field(description="a boolean: Qwen3's and SmolLM3's thinking switch")] = None
    chat_template_kwargs: Annotated[ChatTemplateKwargs | None, Field(
        description="an object {\"enable_thinking\": boolean}")] = None
    response_format: ResponseFormat | None = unsupported('only {"type": "text"}: no JSON mode')
    tools: None = unsupported("no tool calls")
    tool_choice: Literal["none"] | None = unsupported("no tool calls")
    parallel_tool_calls: None = unsupported("no tool calls")
    functions: None = unsupported("no function calls")
    function_call: Literal["none"] | None = unsupported("no function calls")


class ModelBody(Strict):
    """The admin actions' body."""
    model: Annotated[str, Field(min_length=1, pattern=r"\S", description="a non-empty string: a folder or a hub id")]


class Invalid(ValueError):
    """A request that does not fit its schema: `message` in OpenAI's style and the field (`param`)."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.message, self.param = message, param


def validate(schema: type[Strict], body: dict) -> Strict:
    try:
        return schema.model_validate(body)
    except ValidationError as e:
        raise Invalid(*explain(schema, e.errors()[0])) from None


def explain(schema: type[Strict], error: dict) -> tuple[str, str | None]:
    """One pydantic error as a sentence naming the field, and the field."""
    loc = error["loc"]
    name = str(loc[0]) if loc else None
    field = schema.model_fields.get(name) if name else None
    if error["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {name}", name
    if error["type"] == "missing" and len(loc) == 1:
        return f"'{name}' is required", name
    if field is None:
        return error["msg"], name
    why = (field.json_schema_extra or {}).get(UNSUPPORTED) if isinstance(field.json_schema_extra, dict) else None
    if why:
        return f"'{name}' is not supported: {why}", name
    message = f"'{name}' must be {_described(field)}"
    if len(loc) > 1 and isinstance(loc[1], int):   # an item of a list: say which, and what is wrong with it
        path = f"{name}[{loc[1]}]" + "".join(f".{p}" for p in loc[2:] if isinstance(p, str) and p.isidentifier()
                                             and p not in ("str", "int", "float", "bool"))   # not a union's tag
        message += f" ({path}: {error['msg']})"
    return message, name


def _described(field) -> str:
    if field.description:
        return field.description
    for meta in field.metadata:   # an Annotated type made by integer() or number() inside `X | None`
        if getattr(meta, "description", None):
            return meta.description
    inner = [a for a in getattr(field.annotation, "__args__", ()) if a is not type(None)]
    for kind in inner:
        for meta in getattr(kind, "__metadata__", ()):
            if getattr(meta, "description", None):
                return meta.description
    return "as documented in /openapi.json"
