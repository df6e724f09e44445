"""The OpenAI completions API, without HTTP: a request body in, checked parameters out; a finished
(or streaming) request in, response bodies out; and the OpenAI error body.

Parameters follow ``POST /v1/completions`` (prompt, max_tokens, temperature, top_p, n, seed,
stop, stream, stream_options, echo, model), plus the extensions ``skipdecode`` (a schedule, as
``request_params``), ``top_k`` and ``repetition_penalty``. Unknown fields are ignored, as
OpenAI does; fields the engine cannot honour (logprobs, best_of > n, suffix, logit_bias,
presence/frequency penalties) are a 400 rather than silently dropped. docs/serving.md is the
user's side of this module.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..request_params import OPENAI, RequestError, RequestParams
from ..request_params import parse as parse_request

_UNSUPPORTED_ZERO = ("presence_penalty", "frequency_penalty")
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}


class APIError(Exception):
    """An HTTP error with OpenAI's body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_validation_errors(errors: Sequence[dict]) -> APIError:
    """FastAPI's request validation errors (its 422) as one 400."""
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return invalid(f"the body is not valid JSON{f' ({detail})' if detail else ''}", code="invalid_json")
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if not loc:
        return invalid("the body must be a JSON object (Content-Type: application/json)", code="invalid_body")
    return invalid(f"{'.'.join(loc)}: {first.get('msg', 'invalid value')}", ".".join(loc))


# -- request ----------------------------------------------------------------------------------------
MAX_CHOICES = 128             # prompts x n in one request


@dataclass
class CompletionParams:
    prompts: list              # each a str or a list of token ids
    sampling: RequestParams    # the request's meaning, as every door reads it
    model: str | None = None
    n: int = 1
    echo: bool = False
    stream: bool = False
    include_usage: bool = False

    @property
    def max_tokens(self) -> int:
        return self.sampling.max_new_tokens

    @property
    def stop(self) -> tuple[str, ...]:
        return self.sampling.stop

    def knobs(self, index: int) -> dict:
        """``ServingEngine.submit`` keywords of choice ``index``: with a seed, choice i draws from
        ``seed + i`` (mod 2**64), so choice 0 is what the same request with n=1 returns."""
        return self.sampling.knobs(seed_offset=index)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field(body: dict, name: str, check: Callable[[Any], bool], what: str, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise invalid(f"{name} must be {what} (got {json.dumps(value)[:80]})", name)
    return value


def parse_completion(body: dict) -> CompletionParams:
    """Check every field's type and range that does not depend on the model; raise APIError (400).
    The sampling and schedule fields are ``request_params``' (one meaning for every door)."""
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object", code="invalid_body")
    model = _field(body, "model", lambda v: isinstance(v, str), "a string")
    prompts = _prompts(body.get("prompt"))
    try:
        sampling = parse_request(body, OPENAI)  # unknown keys ignored, as OpenAI does
    except RequestError as exc:
        raise invalid(str(exc), exc.param) from None
    n = _field(body, "n", lambda v: _is_int(v) and 1 <= v <= MAX_CHOICES, f"an integer in [1, {MAX_CHOICES}]", 1)
    if len(prompts) * n > MAX_CHOICES:
        raise invalid(f"{len(prompts)} prompts x n={n} asks for more than {MAX_CHOICES} completions", "n")
    echo = _field(body, "echo", lambda v: isinstance(v, bool), "a boolean", False)
    stream = _field(body, "stream", lambda v: isinstance(v, bool), "a boolean", False)
    options = _field(body, "stream_options", lambda v: isinstance(v, dict), "an object", {})
    include_usage = _field(options, "include_usage", lambda v: isinstance(v, bool), "a boolean", False)
    _unsupported(body, n)
    return CompletionParams(prompts, sampling, model, n, echo, stream, include_usage)


def _prompts(prompt: Any) -> list:
    what = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise invalid(f"prompt must be {what}" if prompt != [] else "prompt is empty", "prompt")
    text = isinstance(prompt[0], str)
    for p in prompt:
        if not (isinstance(p, str) if text else isinstance(p, list) and all(_is_int(t) for t in p)):
            raise invalid(f"prompt must be {what}", "prompt")
        if not p:
            raise invalid("a prompt is empty", "prompt")
    if len(prompt) > MAX_CHOICES:
        raise invalid(f"at most {MAX_CHOICES} prompts per request", "prompt")
    return prompt


def _unsupported(body: dict, n: int) -> None:
    def refuse(name: str, why: str = "") -> APIError:
        return invalid(f"{name} is not supported by this server{why}", name, "unsupported_parameter")

    if body.get("logprobs") is not None:
        raise refuse("logprobs", " (the engine does not return log-probabilities)")
    if body.get("best_of") not in (None, n):
        raise refuse("best_of", " (other than n)")
    if body.get("suffix") not in (None, ""):
        raise refuse("suffix")
    if body.get("logit_bias") not in (None, {}):
        raise refuse("logit_bias")
    for name in _UNSUPPORTED_ZERO:
        if body.get(name) not in (None, 0, 0.0):
            raise refuse(name, "; repetition_penalty (Hugging Face semantics) is")


def prompt_ids(params: CompletionParams, encode: Callable[[str], list[int]] | None, vocab_size: int,
               max_length: int) -> list[list[int]]:
    """The prompts as token ids, each checked against the vocabulary and the engine's length: a
    prompt of P tokens with max_tokens M needs P + M - 1 positions (the last token is not fed back)."""
    rows = []
    for p in params.prompts:
        if isinstance(p, str):
            if encode is None:
                raise invalid("this model has no tokenizer: send the prompt as token ids", "prompt")
            p = encode(p)
        bad = next((t for t in p if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise invalid(f"token id {bad} is outside the vocabulary [0, {vocab_size})", "prompt")
        if len(p) + params.max_tokens - 1 > max_length:
            raise invalid(f"this model's maximum context length is {max_length} tokens; the prompt has {len(p)} "
                          f"tokens and max_tokens is {params.max_tokens} (a prompt of P tokens allows "
                          f"max_tokens <= {max_length} - P + 1)", "max_tokens", "context_length_exceeded")
        rows.append(list(p))
    return rows


def request_schedule(params: CompletionParams, num_layers: int, default):
    """The schedule of the request's ``skipdecode`` object (what the CLI's schedule flags mean,
    modifying the server's default; a new decay spans the request's max_tokens - 1 decode steps),
    or the default without one."""
    try:
        return params.sampling.schedule_for(num_layers, default)
    except RequestError as exc:
        raise invalid(str(exc), exc.param, "invalid_schedule") from None


# -- response ---------------------------------------------------------------------------------------
def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def echo_text(prompt, ids: list[int], decode) -> str:
    """What ``echo`` puts before the completion: a text prompt as sent, token ids decoded."""
    if isinstance(prompt, str):
        return prompt
    return decode(ids) if decode is not None else ""


def finish_reason(request) -> str:
    return FINISH_REASONS.get(request.finish_reason, "length")


def choice_extension(request) -> dict:
    """Per choice: the generated token ids, the layers run for each token (entry 0: the prompt's,
    which produce token 0) and their mean over the decode steps (tokens 1..; as
    ``GenerationResult.mean_layers_per_token``)."""
    layers = list(request.layers_per_token)
    steps = layers[1:]
    mean = sum(steps) / len(steps) if steps else float(len(request.schedule.prompt_layers()))
    return {"token_ids": list(request.tokens), "layers_per_token": layers, "mean_layers": mean,
            "layer_speedup": request.schedule.num_layers / mean if mean else None}


def schedule_extension(schedule) -> dict:
    return {"schedule": schedule.to_dict(), "num_layers": schedule.num_layers}


def choice(index: int, text: str, reason: str | None, extension: dict | None = None) -> dict:
    body = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
    if extension is not None:
        body["skipdecode"] = extension
    return body


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(id: str, created: int, model: str, choices: list[dict], usage_block: dict | None,
               schedule=None) -> dict:
    """A response body (``usage_block`` None: a stream chunk without usage)."""
    body: dict = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if usage_block is not None:
        body["usage"] = usage_block
    if schedule is not None:
        body["skipdecode"] = schedule_extension(schedule)
    return body


def sse(data: dict | str) -> str:
    """One server-sent event."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
