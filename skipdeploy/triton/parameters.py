"""Parsing the Triton model's requests: ``sampling_parameters`` and the repository's config.

Pure Python (no Triton), so that it is tested without a server; ``model.py`` runs it in the
Python backend's stub. The keys and defaults follow Triton's vLLM backend (max_tokens 16,
temperature 1.0), plus ``skipdecode`` (schedule fields, as the CLI's schedule flags).
"""

from __future__ import annotations

import json
import math
import os

CONFIG_FILE = "skipdeploy.json"
DEFAULT_MAX_TOKENS = 16          # vLLM's default
DEFAULT_TEMPERATURE = 1.0        # vLLM's default; 0 is greedy
SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "stop",
                 "stop_token_ids", "ignore_eos", "skipdecode")
SCHEDULE_KEYS = ("target_speedup", "max_layers", "min_layers", "warmup_layers", "decay_tokens", "prompt_layers",
                 "table", "full")
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort", "error": "abort"}

class RequestError(ValueError):
    """A request the model refuses: one line, and the Triton error code's name."""

    def __init__(self, message: str, code: str = "INVALID_ARG") -> None:
        super().__init__(message)
        self.code = code


# -- parsing (no Triton needed) -----------------------------------------------------------------------
def _number(name: str, value, integer: bool = False):
    if isinstance(value, str):  # vLLM clients send "0.7", "16"
        try:
            value = float(value) if not integer else int(value, 10)
        except ValueError:
            raise RequestError(f"sampling_parameters.{name} must be {'an integer' if integer else 'a number'} "
                               f"(got {value!r})") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"sampling_parameters.{name} must be {'an integer' if integer else 'a number'} "
                           f"(got {value!r})")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RequestError(f"sampling_parameters.{name} must be finite (got {value!r})")
        if integer:
            if not value.is_integer():
                raise RequestError(f"sampling_parameters.{name} must be an integer (got {value!r})")
            value = int(value)
    return value


def _flag(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RequestError(f"sampling_parameters.{name} must be true or false (got {value!r})")


def parse_sampling_parameters(text) -> dict:
    """``sampling_parameters`` (a JSON object, as text or bytes; None or empty: all defaults) ->
    ``{"max_tokens", "knobs" (ServingEngine.submit keywords), "skipdecode" (dict or None)}``,
    or a RequestError naming the key."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("sampling_parameters is not UTF-8 text") from None
    params = {}
    if text is not None and text.strip():
        try:
            params = json.loads(text)
        except ValueError as exc:
            raise RequestError(f"sampling_parameters is not valid JSON: {exc}") from None
        if not isinstance(params, dict):
            raise RequestError(f"sampling_parameters must be a JSON object (got {type(params).__name__})")
    params = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(params) - set(SAMPLING_KEYS))
    if unknown:
        raise RequestError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(SAMPLING_KEYS)}")
    max_tokens = _number("max_tokens", params.get("max_tokens", DEFAULT_MAX_TOKENS), integer=True)
    if max_tokens < 1:
        raise RequestError(f"sampling_parameters.max_tokens must be >= 1 (got {max_tokens})")
    knobs: dict = {"temperature": float(_number("temperature", params.get("temperature", DEFAULT_TEMPERATURE)))}
    if "top_p" in params:
        knobs["top_p"] = float(_number("top_p", params["top_p"]))
    if "top_k" in params:
        top_k = _number("top_k", params["top_k"], integer=True)
        knobs["top_k"] = 0 if top_k == -1 else top_k  # vLLM's -1 is off
    if "seed" in params:
        knobs["seed"] = _number("seed", params["seed"], integer=True)
    if "repetition_penalty" in params:
        knobs["repetition_penalty"] = float(_number("repetition_penalty", params["repetition_penalty"]))
    if "stop" in params:
        stop = params["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
            raise RequestError("sampling_parameters.stop must be a non-empty string or a list of them")
        if stop:
            knobs["stop_strings"] = tuple(stop)
    if "stop_token_ids" in params:
        ids = params["stop_token_ids"]
        if not isinstance(ids, list):
            raise RequestError("sampling_parameters.stop_token_ids must be a list of token ids")
        if ids:
            knobs["stop_token_ids"] = tuple(_number("stop_token_ids", t, integer=True) for t in ids)
    if "ignore_eos" in params and _flag("ignore_eos", params["ignore_eos"]):
        knobs["eos_token_id"] = None
    skipdecode = params.get("skipdecode")
    if skipdecode is not None:
        if isinstance(skipdecode, str):  # a JSON object given as text
            try:
                skipdecode = json.loads(skipdecode)
            except ValueError:
                skipdecode = None
        if not isinstance(skipdecode, dict):
            raise RequestError("sampling_parameters.skipdecode must be an object of schedule fields")
        skipdecode = {k: v for k, v in skipdecode.items() if v is not None}
        unknown = sorted(set(skipdecode) - set(SCHEDULE_KEYS))
        if unknown:
            raise RequestError(f"unknown skipdecode field(s) {', '.join(unknown)}; known: {', '.join(SCHEDULE_KEYS)}")
        if "full" in skipdecode and not isinstance(skipdecode["full"], bool):
            raise RequestError("skipdecode.full must be true or false")
        for key, value in skipdecode.items():
            if key in ("target_speedup",):
                skipdecode[key] = _number(f"skipdecode.{key}", value)
            elif key in ("max_layers", "min_layers", "warmup_layers", "decay_tokens"):
                skipdecode[key] = _number(f"skipdecode.{key}", value, integer=True)
            elif key == "table":
                if not isinstance(value, list):
                    raise RequestError("skipdecode.table must be a list of layer counts")
                skipdecode[key] = [_number("skipdecode.table", v, integer=True) for v in value]
    return {"max_tokens": max_tokens, "knobs": knobs, "skipdecode": skipdecode}


def read_config(version_dir: str) -> dict:
    """``skipdeploy.json`` beside this file, with the export's path made absolute."""
    path = os.path.join(version_dir, CONFIG_FILE)
    with open(path) as f:
        config = json.load(f)
    export = config["export"]
    config["export"] = export if os.path.isabs(export) else os.path.normpath(os.path.join(version_dir, export))
    return config


# -- one request in flight ----------------------------------------------------------------------------
