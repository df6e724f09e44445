"""Parsing the Triton model's requests: ``sampling_parameters`` and the repository's config.

Pure Python (no Triton), so that it is tested without a server; ``model.py`` runs it in the
Python backend's stub. The fields are ``request_params``' as Triton's vLLM backend spells them
(max_tokens, its defaults 16 and temperature 1.0, numbers as strings), plus ``skipdecode``
(schedule fields, as the CLI's schedule flags).
"""

from __future__ import annotations

import json
import os

from skipdeploy.request_params import TRITON, RequestParams
from skipdeploy.request_params import RequestError as InvalidField
from skipdeploy.request_params import parse as parse_request

CONFIG_FILE = "skipdeploy.json"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort", "error": "abort"}

class RequestError(ValueError):
    """A request the model refuses: one line, and the Triton error code's name."""

    def __init__(self, message: str, code: str = "INVALID_ARG") -> None:
        super().__init__(message)
        self.code = code


# -- parsing (no Triton needed) -----------------------------------------------------------------------
def parse_sampling_parameters(text) -> RequestParams:
    """``sampling_parameters`` (a JSON object, as text or bytes; None or empty: all defaults) ->
    the request's :class:`RequestParams` (``request_params``' fields as vLLM spells them), or a
    RequestError naming the key."""
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
    try:
        return parse_request(params, TRITON)
    except InvalidField as exc:
        raise RequestError(str(exc)) from None


def read_config(version_dir: str) -> dict:
    """``skipdeploy.json`` beside this file, with the export's path made absolute."""
    path = os.path.join(version_dir, CONFIG_FILE)
    with open(path) as f:
        config = json.load(f)
    export = config["export"]
    config["export"] = export if os.path.isabs(export) else os.path.normpath(os.path.join(version_dir, export))
    return config


# -- one request in flight ----------------------------------------------------------------------------
