"""The cffi binding of the C API, made from the table in ``functions.py``.

For every function that runs Python, ``bindings`` makes the ``extern "Python"`` function the C
wrapper calls: it converts the C arguments by their roles, calls the ``Bridge`` method the table
names, writes the result into the caller's buffers, and turns every exception into a status
(``status.status_of``) plus a one-line message for ``sd_last_error`` (which lives in C, per
thread). No Python exception ever reaches C. ``install`` registers them with ``@ffi.def_extern``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ..errors import InputError
from .functions import PYTHON_FUNCTIONS, Function
from .status import PY_BASE, Status, message_of, status_of

OK = PY_BASE + Status.SD_OK


def bindings(ffi, lib, bridge, functions: tuple[Function, ...] = PYTHON_FUNCTIONS) -> dict[str, Callable]:
    """The Python function behind each ``extern "Python"`` name of ``functions`` (not registered
    yet). A ``Bridge`` method that the table names and ``bridge`` lacks is an AttributeError here,
    at install, not at the first call."""

    def report(status: Status, message: str) -> int:
        lib._sd_set_error(message.encode("utf-8", "replace"))
        return PY_BASE + status

    def text_arg(ptr, what: str) -> str | None:
        if ptr == ffi.NULL:
            return None
        try:
            return ffi.string(ptr).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{what} is not valid UTF-8 (byte {exc.start})") from None

    def put_ids(where: str, ids: list[int], out, capacity: int, out_len) -> int:
        out_len[0] = len(ids)
        if len(ids) > capacity:
            if capacity:
                out[0:capacity] = ids[:capacity]
            return report(Status.SD_ERR_BUFFER, f"{where}: out_capacity is {capacity} and {len(ids)} token ids were "
                                                "produced; *out_len says how many to make room for")
        if ids:
            out[0:len(ids)] = ids
        return OK

    def put_text(where: str, text: str, out, capacity: int, out_len) -> int:
        data = text.encode("utf-8", "replace")
        out_len[0] = len(data)
        if len(data) + 1 > capacity:
            if capacity:
                prefix = data[:capacity - 1].decode("utf-8", "ignore").encode("utf-8")
                ffi.memmove(out, prefix + b"\0", len(prefix) + 1)
            return report(Status.SD_ERR_BUFFER, f"{where}: the text is {len(data)} bytes and needs out_capacity >= "
                                                f"{len(data) + 1} (with the NUL); out_capacity is {capacity}")
        ffi.memmove(out, data + b"\0", len(data) + 1)
        return OK

    def argument(role: str, i: int, name: str) -> Callable[[tuple], Any] | None:
        """How the bridge method's argument is made from the C arguments ``a`` (None: it is not
        one; the second half of a pair is read with the first)."""
        if role == "rt":
            return lambda a: int(ffi.cast("uintptr_t", a[i]))
        if role == "path":
            return lambda a: os.fsdecode(ffi.string(a[i]))
        if role in ("text", "json"):
            return lambda a: text_arg(a[i], name)
        if role == "ids":
            return lambda a: ffi.unpack(a[i], a[i + 1]) if a[i + 1] else []
        if role == "callback":
            return lambda a: (lambda token: a[i](token, a[i + 1]))
        return None

    def writer(f: Function) -> Callable[[Any, tuple], int]:
        """How the bridge method's result goes back to C."""
        roles = [p.role for p in f.params]
        if f.result is None:
            return lambda result, a: OK
        i = roles.index(f.result)
        if f.result == "handle_out":
            def put_handle(result, a) -> int:
                a[i][0] = ffi.cast("sd_runtime *", result)
                return OK
            return put_handle
        put = put_ids if f.result == "ids_out" else put_text
        n = roles.index("out_len")
        return lambda result, a: put(f.name, result, a[i], a[i + 1], a[n])

    def binding(f: Function) -> Callable:
        method = getattr(bridge, f.method)
        arguments = [conv for i, p in enumerate(f.params) if (conv := argument(p.role, i, p.name)) is not None]
        write = writer(f)

        def call(*a):
            try:
                return write(method(*[conv(a) for conv in arguments]), a)
            except BaseException as exc:
                return report(status_of(exc, f.at_load), message_of(exc, f.name))

        call.__name__ = f.extern
        return call

    return {f.extern: binding(f) for f in functions}


def install(ffi, lib, bridge, functions: tuple[Function, ...] = PYTHON_FUNCTIONS) -> tuple[str, ...]:
    """Register the bindings of ``functions`` with the built library's ``ffi``; returns their
    names. Called once, by the library's init code (through ``bridge.install``)."""

    def onerror(exc_type, exc_value, tb) -> None:
        # Only reached if the handling in the binding itself failed: the call returns SD_ERR_INTERNAL.
        try:
            lib._sd_set_error(message_of(exc_value, "internal error").encode("utf-8", "replace"))
        except BaseException:
            pass

    made = bindings(ffi, lib, bridge, functions)
    for name, func in made.items():
        ffi.def_extern(name=name, error=PY_BASE + Status.SD_ERR_INTERNAL, onerror=onerror)(func)
    return tuple(made)
