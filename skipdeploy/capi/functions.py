"""The C API in one table: its types and every exported ``sd_*`` function (its status codes are
``status.Status``).

Everything else is generated from these (``header.py``): the public header's enum, typedefs,
prototypes and their doc comments; cffi's ``extern "Python"`` declarations; the C wrapper of each
function; and (``binding.py``) the Python side that converts its arguments, calls the ``Bridge``
method and writes the result back. Adding a function is one entry in ``FUNCTIONS`` (plus, if it
runs Python, its ``Bridge`` method).

A parameter's *role* says what both sides do with it, so that the C checks and the Python
conversion cannot disagree:

========== ============================== ================================= ==========================
role       C type                         C wrapper checks                  Python side passes
========== ============================== ================================= ==========================
rt         ``sd_runtime *``               not NULL (NULL: no-op if void)    the handle id
path       ``const char *``               not NULL                          ``os.fsdecode`` of it
text       ``const char *``               not NULL                          str (UTF-8)
json       ``const char *``               may be NULL                       str or None
ids        ``const int64_t *`` + ``len``  NULL only if the length is 0      list of ints
callback   ``sd_token_fn`` + ``user``     not NULL                          ``f(token) -> stop?``
handle_out ``sd_runtime **``              not NULL; set to NULL first       (the result: a handle id)
ids_out    ``int64_t *`` + ``capacity``   NULL only if the capacity is 0    (the result: list of ints)
text_out   ``char *`` + ``capacity``      as ids_out; NUL-terminated first  (the result: str)
out_len    ``size_t *``                   not NULL; set to 0 first          (the result's length)
status     ``sd_status``                  (C-only functions)                (not passed)
========== ============================== ================================= ==========================
"""

from __future__ import annotations

from dataclasses import dataclass

from .status import Status


@dataclass(frozen=True)
class Typedef:
    doc: str
    decl: str        # the C declaration, with its ";"


TYPEDEFS = (
    Typedef("A loaded export and its engine (an opaque handle, not a pointer to memory).",
            "typedef struct sd_runtime sd_runtime;"),
    Typedef("Called once per generated token, in order, on the calling thread; return non-zero to stop (the "
            "request is cancelled and sd_generate_stream returns SD_OK).",
            "typedef int (*sd_token_fn)(int64_t token, void *user);"),
)


@dataclass(frozen=True)
class Param:
    decl: str        # "const int64_t *prompt"
    role: str        # see the module's docstring; "len", "user", "capacity" follow their partner

    @property
    def name(self) -> str:
        return self.decl.replace("*", " ").split()[-1]

    @property
    def ctype(self) -> str:
        return self.decl[:len(self.decl) - len(self.name)].strip()


ROLES = ("rt", "path", "text", "json", "ids", "len", "callback", "user", "handle_out", "ids_out", "text_out",
         "capacity", "out_len", "status")
# Roles that are the second half of a pair: the role before them names what they belong to.
PAIRED = {"len": ("ids",), "user": ("callback",), "capacity": ("ids_out", "text_out")}


@dataclass(frozen=True)
class Function:
    """One exported function. ``method`` is the ``Bridge`` method that does its work in Python
    (None for a function in C alone, whose body is ``c_body``)."""

    name: str
    returns: str
    params: tuple[Param, ...]
    doc: str
    method: str | None = None
    c_body: str | None = None
    at_load: bool = False     # export and backend errors are SD_ERR_EXPORT (not SD_ERR_INTERNAL)

    @property
    def extern(self) -> str:
        """The name of its ``extern "Python"`` function (the C wrapper calls it)."""
        return "_sdpy_" + self.name.removeprefix("sd_")

    def role(self, role: str) -> Param | None:
        return next((p for p in self.params if p.role == role), None)

    @property
    def result(self) -> str | None:
        """What the Python side writes back: "handle_out", "ids_out", "text_out" or None."""
        return next((p.role for p in self.params if p.role in ("handle_out", "ids_out", "text_out")), None)


def _params(*pairs: tuple[str, str]) -> tuple[Param, ...]:
    return tuple(Param(decl, role) for decl, role in pairs)


_IDS_OUT = (("int64_t *out", "ids_out"), ("size_t out_capacity", "capacity"), ("size_t *out_len", "out_len"))
_TEXT_OUT = (("char *out", "text_out"), ("size_t out_capacity", "capacity"), ("size_t *out_len", "out_len"))
_RT = ("sd_runtime *rt", "rt")


def _status_name_body() -> str:
    cases = "".join(f'    case {s.name}: return "{s.name}";\n' for s in Status)
    return f'    switch (status) {{\n{cases}    }}\n    return "SD_UNKNOWN";\n'


FUNCTIONS: tuple[Function, ...] = (
    Function("sd_version", "const char *", (),
             'The library\'s version, e.g. "0.1.0" (never NULL, needs no initialisation).',
             c_body="    return SKIPDEPLOY_VERSION;\n"),
    Function("sd_status_name", "const char *", _params(("sd_status status", "status")),
             '"SD_OK", "SD_ERR_INPUT", ... ("SD_UNKNOWN" for other values).',
             c_body=_status_name_body()),
    Function("sd_load", "sd_status",
             _params(("const char *export_dir", "path"), ("const char *options_json", "json"),
                     ("sd_runtime **out", "handle_out")),
             "Load an export directory and start its engine. options_json: NULL or a JSON object with backend "
             '("onnxruntime" or "torch"), device ("cpu"), threads, memory_limit (bytes), check_files (verify '
             "sha256, default true), max_batch (16), max_queue (64), max_length, prefill_chunk (64). On success "
             "*out is the handle; on failure *out is NULL.",
             method="load", at_load=True),
    Function("sd_generate", "sd_status",
             _params(_RT, ("const int64_t *prompt", "ids"), ("size_t prompt_len", "len"),
                     ("const char *params_json", "json"), *_IDS_OUT),
             "Generate from prompt token ids. params_json: NULL (the export's schedule, greedy, 32 new tokens) or "
             "a JSON object with max_new_tokens, target_speedup or max_layers / min_layers / warmup_layers / "
             "decay_tokens / prompt_layers (or full, table), temperature, top_k, top_p, repetition_penalty, seed, "
             "stop (a string or a list of strings), stop_token_ids, ignore_eos. Writes the generated ids (up to "
             "and including EOS; not the prompt) to out and their number to *out_len. If out_capacity is too "
             "small: SD_ERR_BUFFER, *out_len is the number needed and out holds the first out_capacity ids (out "
             "may be NULL when out_capacity is 0).",
             method="generate"),
    Function("sd_generate_stream", "sd_status",
             _params(_RT, ("const int64_t *prompt", "ids"), ("size_t prompt_len", "len"),
                     ("const char *params_json", "json"), ("sd_token_fn fn", "callback"), ("void *user", "user")),
             "As sd_generate, but calls fn(token, user) for each token as soon as it is generated.",
             method="stream"),
    Function("sd_generate_text", "sd_status",
             _params(_RT, ("const char *prompt", "text"), ("const char *params_json", "json"), *_TEXT_OUT),
             "Text in, text out (UTF-8; needs an export with a tokenizer). Writes the generated text (without the "
             "prompt) NUL-terminated to out and its length in bytes, WITHOUT the NUL, to *out_len: out_capacity "
             "must be at least *out_len + 1. If it is smaller: SD_ERR_BUFFER, *out_len is still the text's length "
             "(allocate *out_len + 1 bytes) and out holds a NUL-terminated prefix cut at a character boundary. An "
             "empty prompt is SD_ERR_INPUT.",
             method="generate_text"),
    Function("sd_tokenize", "sd_status", _params(_RT, ("const char *text", "text"), *_IDS_OUT),
             "The token ids of a text (as sd_generate_text would feed them: with the BOS token). Buffer rules as "
             "sd_generate.",
             method="tokenize"),
    Function("sd_detokenize", "sd_status",
             _params(_RT, ("const int64_t *ids", "ids"), ("size_t ids_len", "len"), *_TEXT_OUT),
             "The text of token ids. Buffer rules as sd_generate_text.",
             method="detokenize"),
    Function("sd_runtime_info", "sd_status", _params(_RT, *_TEXT_OUT),
             "A JSON object describing the runtime: version, export, num_layers, vocab_size, max_length, "
             "eos_token_id, bos_token_id, pad_token_id, has_tokenizer, schedule, max_batch, max_queue, backend, "
             "dtype. Buffer rules as sd_generate_text.",
             method="info"),
    Function("sd_last_error", "const char *", (),
             "The message of this thread's last call that failed (\"\" after a call that succeeded); valid until "
             "this thread's next call into the library. Never NULL.",
             c_body="    return sd_error;\n"),
    Function("sd_free", "void", _params(_RT),
             "Stop the engine (running generations finish first) and release the runtime. NULL is a no-op. Call "
             "it once, after every call on rt has returned; rt is invalid afterwards.",
             method="free"),
)

PYTHON_FUNCTIONS = tuple(f for f in FUNCTIONS if f.method is not None)


def check_table(functions=FUNCTIONS) -> None:
    """Raise ValueError if an entry is not one the generators can turn into C and Python."""
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise ValueError(f"a function is declared twice: {names}")
    for f in functions:
        if (f.method is None) == (f.c_body is None):
            raise ValueError(f"{f.name}: give exactly one of method (Python) and c_body (C)")
        if f.method is not None and f.returns not in ("sd_status", "void"):
            raise ValueError(f"{f.name}: a function that runs Python returns sd_status or void")
        if f.method is not None and any(p.role == "status" for p in f.params):
            raise ValueError(f"{f.name}: a status parameter is for functions in C alone")
        roles = [p.role for p in f.params]
        for i, role in enumerate(roles):
            if role not in ROLES:
                raise ValueError(f"{f.name}: unknown role {role!r}")
            if role in PAIRED and (i == 0 or roles[i - 1] not in PAIRED[role]):
                raise ValueError(f"{f.name}: {role} must follow one of {PAIRED[role]}")
            if role in ("ids", "callback", "ids_out", "text_out") and roles[i + 1:i + 2] != \
                    [next(k for k, v in PAIRED.items() if role in v)]:
                raise ValueError(f"{f.name}: {role} needs its partner right after it")
        if f.result in ("ids_out", "text_out") and "out_len" not in roles:
            raise ValueError(f"{f.name}: an output buffer needs out_len")


check_table()
