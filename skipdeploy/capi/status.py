"""The C API's status codes, defined once, and how a Python exception becomes one.

``Status`` is ``sd_status``: the header's enum, ``sd_status_name`` and the Python side's return
values are all generated from it.
"""

from __future__ import annotations

import enum

from ..errors import (BackendError, CapacityError, ExportError, InputError, ManifestError, ScheduleError,
                      SkipDeployError)

# Offset of the statuses the Python side returns: a cffi ``extern "Python"`` function returns 0
# when the interpreter cannot run it, and 0 must never read as SD_OK.
PY_BASE = 0x5D00
MESSAGE_LIMIT = 1000   # bytes; the C buffer holds 1023


class Status(enum.IntEnum):
    """``sd_status``: the C enum's names and values (``doc``: its comment in the header)."""

    SD_OK = 0
    SD_ERR_INPUT = 1
    SD_ERR_CAPACITY = 2
    SD_ERR_EXPORT = 3
    SD_ERR_BUFFER = 4
    SD_ERR_INTERNAL = 5

    @property
    def doc(self) -> str:
        return _DOCS[self.name]


_DOCS = {
    "SD_OK": "",
    "SD_ERR_INPUT": "bad argument: NULL pointer, bad JSON, unknown key, token id outside the vocabulary, empty "
                    "prompt, bad schedule, freed handle",
    "SD_ERR_CAPACITY": "does not fit: prompt + new tokens > max_length, queue full, memory",
    "SD_ERR_EXPORT": "sd_load: export missing, damaged or unsupported; backend unavailable",
    "SD_ERR_BUFFER": "out_capacity too small: *out_len says how much is needed",
    "SD_ERR_INTERNAL": "anything else, including an embedded Python that failed to start",
}


def status_of(exc: BaseException, loading: bool = False) -> Status:
    """The sd_status of an exception: bad input, does not fit, a bad export (at load), or internal."""
    if isinstance(exc, (InputError, ScheduleError)):
        return Status.SD_ERR_INPUT
    if isinstance(exc, CapacityError):  # QueueFullError included
        return Status.SD_ERR_CAPACITY
    if loading and isinstance(exc, (ManifestError, ExportError, BackendError)):
        return Status.SD_ERR_EXPORT
    return Status.SD_ERR_INTERNAL


def message_of(exc: BaseException, where: str = "") -> str:
    """One line for sd_last_error: skipdeploy's own message, or the exception's type and text."""
    text = str(exc) if isinstance(exc, SkipDeployError) else f"{type(exc).__name__}: {exc}".rstrip(": ")
    return one_line(f"{where}: {text}" if where else text)


def one_line(text: str) -> str:
    """``text`` on one line, cut to what the C side's message buffer holds."""
    text = " ".join(text.split())
    data = text.encode("utf-8", "replace")
    if len(data) > MESSAGE_LIMIT:
        text = data[:MESSAGE_LIMIT - 3].decode("utf-8", "ignore") + "..."
    return text
