"""The OpenAI-style API: /v1/models, /v1/completions, /v1/chat/completions, /healthz.

Requests are validated up front; anything wrong is an OpenAI-style JSON error with the right
status, and nothing is sent into the cluster for it. The cheap checks come before the costly
work: the body's size before it is read (the server and Flask's MAX_CONTENT_LENGTH: 413), its
text before it is parsed, a prompt's length in characters before it is tokenized.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from flask import Blueprint, Response, current_app, jsonify, request, stream_with_context

from appliance.bus.protocol import Sampling, new_id
from appliance.coordinator.admission import Busy
from appliance.coordinator.coordinator import Coordinator, GenerationError, RequestRecord
from appliance.models.tokenizer import StreamDecoder
from appliance.panel.schema import ChatCompletionRequest, CompletionRequest, Invalid, validate

api = Blueprint("api", __name__)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self):
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}
        return jsonify(body), self.status


@api.errorhandler(ApiError)
def _api_error(e: ApiError):
    coordinator().observer.rejected(e.status)
    return e.response()


@api.errorhandler(GenerationError)
def _generation_error(e: GenerationError):
    kind = "service_unavailable" if e.status == 503 else "server_error"
    return ApiError(e.status, str(e), kind=kind).response()


@api.errorhandler(Busy)
def _busy(e: Busy):
    coordinator().observer.rejected(e.status)
    body, status = ApiError(e.status, str(e), kind="rate_limit_exceeded").response()
    return body, status, {"Retry-After": str(e.retry_after)}


def coordinator() -> Coordinator:
    return current_app.config["coordinator"]


# -- request parsing
@dataclass
class Params:
    model: str
    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    endpoint: str = ""


# Tokenizers rarely make a token of more than a few characters: a prompt of more characters than
# this many per token of context cannot fit, so it is refused before it is tokenized.
CHARS_PER_TOKEN = 16


def json_body() -> dict:
    """The request's JSON object, or a 400 saying what is wrong with it: not UTF-8, a lone
    surrogate escape ("\\ud800", which is no character), nested too deeply, not JSON."""
    if not request.is_json:
        raise ApiError(400, "the request body must be JSON (Content-Type: application/json)")
    data = request.get_data(cache=False)   # over MAX_CONTENT_LENGTH: 413, before reading it
    try:
        body = json.loads(data.decode("utf-8"))
        json.dumps(body, ensure_ascii=False).encode("utf-8")   # fails on a lone surrogate
    except UnicodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 text: {e.reason}") from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse_params(chat: bool) -> Params:
    body = json_body()
    try:
        req = validate(ChatCompletionRequest if chat else CompletionRequest, body)
    except Invalid as e:
        raise ApiError(400, e.message, e.param) from None
    model = coordinator().model
    if model is None or req.model != model.id:
        raise ApiError(404, f"the model '{req.model}' does not exist or is not loaded", "model", "not_found_error")
    context = coordinator().context_limit()   # the model's, or less where the nodes' engines hold fewer
    prompt = _chat_prompt(req, model, context) if chat else _text_prompt(req, model, context)
    if len(prompt) >= context:
        raise ApiError(400, f"the prompt is {len(prompt)} tokens; the cluster's context is {context}", "prompt")
    default_max = context - len(prompt) if chat else 16
    max_tokens = (req.max_completion_tokens if chat else None) or req.max_tokens or default_max
    if len(prompt) + max_tokens > context:
        raise ApiError(400, f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the context of {context} tokens",
                       "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens")
    default = model.generation.sampling()   # generation_config.json's, where the request sets none
    sampling = Sampling(_given(req.temperature, default["temperature"]), _given(req.top_p, default["top_p"]),
                        _given(req.top_k, default["top_k"]), req.seed)
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    logprobs, top = _logprobs_params(req, chat)
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return Params(req.model, prompt, max_tokens, sampling, stop, bool(req.stream), include_usage, logprobs, top,
                  request.path)


def _given(value, default):
    return default if value is None else value


def _logprobs_params(req, chat: bool) -> tuple[bool, int]:
    """Completions: `logprobs` is how many top tokens to list (0-5). Chat: `logprobs` is a boolean
    and `top_logprobs` the count (0-5)."""
    if not chat:
        return req.logprobs is not None, req.logprobs or 0
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return bool(req.logprobs), req.top_logprobs or 0


def _check_prompt_chars(chars: int, context: int, param: str) -> None:
    """Refuse a prompt too long to fit before tokenizing it, which costs time in proportion."""
    if chars > context * CHARS_PER_TOKEN:
        raise ApiError(400, f"the prompt is {chars} characters; this model's context of {context} tokens takes "
                            f"at most {context * CHARS_PER_TOKEN}", param)


def _text_prompt(req: CompletionRequest, model, context: int) -> list[int]:
    prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
    _check_prompt_chars(len(prompt), context, "prompt")
    return model.tokenizer.encode(prompt)


def _chat_prompt(req: ChatCompletionRequest, model, context: int) -> list[int]:
    clean = [{"role": "system" if m.role == "developer" else m.role,
              "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
             for m in req.messages]
    _check_prompt_chars(sum(len(m["role"]) + len(m["content"]) for m in clean), context, "messages")
    return model.tokenizer.apply_chat_template(clean, **_template_switches(req))


def _template_switches(req: ChatCompletionRequest) -> dict:
    """`enable_thinking` (Qwen3's and SmolLM3's templates read it), at the top level or inside
    `chat_template_kwargs` as vLLM takes it."""
    thinking = req.enable_thinking
    if thinking is None and req.chat_template_kwargs is not None:
        thinking = req.chat_template_kwargs.enable_thinking
    return {} if thinking is None else {"enable_thinking": thinking}


# -- generation
@dataclass
class Piece:
    text: str
    token: int | None = None
    logprob: float | None = None
    finish_reason: str | None = None
    top: list = field(default_factory=list)


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters might be the start of a stop string, so must wait."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def run(params: Params, usage: dict):
    """Yield text pieces, honouring stop strings; the last piece carries the finish reason."""
    model = coordinator().model
    decoder = StreamDecoder(model.tokenizer)
    text, sent = "", 0
    record = RequestRecord(new_id(), params.model, [], len(params.prompt), endpoint=params.endpoint)
    tokens = coordinator().generate(params.prompt, params.max_tokens, params.sampling, record, params.logprobs)

    def finish(piece: Piece) -> Piece:
        record.finish_reason = piece.finish_reason
        return piece
    try:
        for token in tokens:
            usage["completion_tokens"] += 1
            if token.id in model.stop_ids:
                yield finish(Piece(text[sent:], finish_reason="stop"))
                return
            text += decoder.push(token.id)
            hits = [text.find(s, max(0, sent - len(s))) for s in params.stop]
            hits = [h for h in hits if h >= 0]
            if hits:
                yield finish(Piece(text[sent:min(hits)], token.id, token.logprob, "stop", token.top))
                return
            end = len(text) - held_back(text, params.stop)
            yield Piece(text[sent:end], token.id, token.logprob, None, token.top)
            sent = end
        yield finish(Piece(text[sent:], finish_reason="length"))
    finally:
        tokens.close()


def _usage(params: Params) -> dict:
    return {"prompt_tokens": len(params.prompt), "completion_tokens": 0, "total_tokens": 0}


def _finish_usage(usage: dict) -> dict:
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def sse(data) -> str:
    return f"data: {json.dumps(data)}\n\n"


def respond(params: Params, chat: bool):
    kind = "chat.completion" if chat else "text_completion"
    base = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
            "model": params.model}
    usage = _usage(params)
    pieces = run(params, usage)
    if not params.stream:
        collected = list(pieces)
        text = "".join(p.text for p in collected)
        finish = collected[-1].finish_reason
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                   "logprobs": _chat_logprobs(params, collected)}
                  if chat else {"index": 0, "text": text, "finish_reason": finish,
                                "logprobs": _logprobs(params, collected)})
        return jsonify({**base, "object": kind, "choices": [choice], "usage": _finish_usage(usage)})

    first = next(pieces)  # errors before the first token still get a proper status code

    def events():
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"
        try:
            if chat:
                yield sse({**base, "object": chunk_kind, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                                       "finish_reason": None}]})
            for piece in _chain(first, pieces):
                if not piece.text and not piece.finish_reason:
                    continue
                choice = ({"index": 0, "delta": {"content": piece.text} if piece.text else {},
                           "finish_reason": piece.finish_reason, "logprobs": _chat_logprobs(params, [piece])}
                          if chat else {"index": 0, "text": piece.text, "finish_reason": piece.finish_reason,
                                        "logprobs": _logprobs(params, [piece])})
                yield sse({**base, "object": chunk_kind, "choices": [choice]})
            if params.include_usage:
                yield sse({**base, "object": chunk_kind, "choices": [], "usage": _finish_usage(usage)})
            yield "data: [DONE]\n\n"
        except GenerationError as e:   # the stream has begun: the error is its last event, with what it cost
            error = {"error": {"message": str(e), "type": "server_error", "param": None, "code": e.status}}
            yield sse({**error, **({"usage": _finish_usage(usage)} if params.include_usage else {})})
        finally:
            pieces.close()

    return Response(stream_with_context(events()), mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chain(first, rest):
    yield first
    yield from rest


def _token_text(token: int) -> str:
    return coordinator().model.tokenizer.decode([token])


def _logprobs(params: Params, pieces: list[Piece]):
    """The completions form: tokens, token_logprobs, top_logprobs (a dict per token), text_offset."""
    if not params.logprobs:
        return None
    kept = [p for p in pieces if p.token is not None]
    tokens = [_token_text(p.token) for p in kept]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    top = [{_token_text(i): lp for i, lp in p.top[:params.top_logprobs]} for p in kept] if params.top_logprobs else None
    return {"tokens": tokens, "token_logprobs": [p.logprob for p in kept], "top_logprobs": top, "text_offset": offsets}


def _chat_logprobs(params: Params, pieces: list[Piece]):
    """The chat form: {"content": [{token, logprob, bytes, top_logprobs: [...]}]}."""
    if not params.logprobs:
        return None

    def entry(token: int, logprob: float) -> dict:
        text = _token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
    return {"content": [{**entry(p.token, p.logprob), "top_logprobs": [entry(i, lp) for i, lp in p.top[:params.top_logprobs]]}
                        for p in pieces if p.token is not None]}


@api.post("/v1/completions")
def completions():
    return respond(parse_params(chat=False), chat=False)


@api.post("/v1/chat/completions")
def chat_completions():
    return respond(parse_params(chat=True), chat=True)


@api.get("/v1/models")
def models():
    model = coordinator().model
    data = [{"id": model.id, "object": "model", "created": model.created, "owned_by": "exo"}] if model else []
    return jsonify({"object": "list", "data": data})


@api.get("/healthz")
def healthz():
    """200 when a request would be served now; 503 and the reason until then (as llama-server does),
    so a load balancer or a start script can wait on it."""
    cluster = coordinator().cluster
    reason = coordinator().unready_reason()
    plan = cluster.ready_plan()
    return jsonify({"status": "ok" if reason is None else "unavailable", "reason": reason,
                    "nodes": len(cluster.nodes), "ready": reason is None,
                    "coordinator": {"id": cluster.coordinator_id, "leader": cluster.is_leader},
                    "plan": plan.to_dict() if plan else None, "plan_error": cluster.plan_error}), \
        200 if reason is None else 503
