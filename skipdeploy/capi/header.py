"""The C API's text, generated from the table in ``functions.py``: the public header users
include, cffi's declarations, and the C that the cffi build compiles.

``header(version)`` is written to ``DIR/include/skipdeploy.h``: the documented contract, with the
doc comments of ``functions.FUNCTIONS``. ``cdef()`` declares, for cffi, the functions implemented in
Python (``extern "Python"``, bound by ``binding.py``) and the C helpers Python calls.
``wrappers(program)`` implements the exported ``sd_*`` functions in C: they check pointers (by
each parameter's role), start the embedded interpreter, and never report ``SD_OK`` unless the
Python side really ran and said so (a cffi ``extern "Python"`` function returns 0 when Python could
not start; ours return ``PY_BASE + status`` instead, and anything else becomes ``SD_ERR_INTERNAL``).
"""

from __future__ import annotations

import textwrap

from .functions import FUNCTIONS, PYTHON_FUNCTIONS, TYPEDEFS, Function
from .status import PY_BASE, Status

WIDTH = 110

HEAD = r"""/* skipdeploy.h: the C API of skipdeploy @VERSION@ (SkipDecode OPT models, in-flight batching).
 *
 * Link with `pkg-config --cflags --libs skipdeploy`. Every function is safe to call from many
 * threads at once; concurrent generations on one sd_runtime are batched by its in-flight engine.
 * Functions that return sd_status never abort the process: on failure sd_last_error() says why,
 * in one line. See docs/c-api.md for the JSON keys of options_json and params_json.
 *
 * Generated from skipdeploy/capi/functions.py: edit the table there, not this file.
 */
#ifndef SKIPDEPLOY_H
#define SKIPDEPLOY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SKIPDEPLOY_VERSION "@VERSION@"
"""

TAIL = r"""#ifdef __cplusplus
}
#endif

#endif /* SKIPDEPLOY_H */
"""

# The C helpers the Python side calls (defined in RUNTIME).
HELPERS_CDEF = r"""
void _sd_set_error(const char *message);
void _sd_set_ready(void);
void _sd_set_init_error(const char *message);
int _sd_embedded(void);
"""

# C compiled into the library after the header and before the wrappers: the per-thread error,
# the interpreter's start-up and the check of what the Python side returned. @PROGRAM@ is the
# interpreter's path as a wide string literal.
RUNTIME = r"""
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define SD_PY_BASE @PY_BASE@
#define SD_ERROR_SIZE 1024

/* Defined further down by cffi; documented as callable from set_source() code. */
static int cffi_start_python(void);

static __thread char sd_error[SD_ERROR_SIZE];   /* this thread's last failure */
static volatile int sd_ready = 0;               /* set by the init code once the bridge is installed */
static int sd_embedded = 0;                     /* this library started the interpreter */
static char sd_init_error[SD_ERROR_SIZE];

/* Runs when the library is loaded: point an interpreter that this library will start at the
 * Python that built it (its pyvenv.cfg, so sys.prefix, site-packages and _cffi_backend are the
 * build's even under `env -i`). A host that already runs Python keeps its own. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"
__attribute__((constructor)) static void sd_set_program_name(void)
{
    if (!Py_IsInitialized()) {
        Py_SetProgramName(@PROGRAM@);
        sd_embedded = 1;
    }
}
#pragma GCC diagnostic pop

void _sd_set_error(const char *message)
{
    snprintf(sd_error, SD_ERROR_SIZE, "%s", message ? message : "");
}

void _sd_set_ready(void) { __sync_synchronize(); sd_ready = 1; }

void _sd_set_init_error(const char *message)
{
    snprintf(sd_init_error, SD_ERROR_SIZE, "%s", message ? message : "");
}

int _sd_embedded(void) { return sd_embedded; }

static sd_status sd_fail(sd_status status, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    vsnprintf(sd_error, SD_ERROR_SIZE, fmt, args);
    va_end(args);
    return status;
}

/* Start the interpreter, once, under our own lock. cffi's start-up takes a spin lock that lives in
 * a field of PyCapsule_Type (Python < 3.12) and waits for it to be 0; once Python has run a
 * while (say, torch was imported) it need not be, and the caller spins forever. So: in a process
 * that already runs Python with that field set, refuse; and let only the first call go through
 * cffi's start-up (later ones, even those that arrive while it runs, read what it left). */
static pthread_mutex_t sd_start_lock = PTHREAD_MUTEX_INITIALIZER;
static int sd_started = 0;      /* a start was attempted */
static int sd_start_status = 0; /* what cffi_start_python() returned */

static int sd_start(const char *fn)
{
    if (sd_ready)
        return 1;
    pthread_mutex_lock(&sd_start_lock);
    if (!sd_started) {
        sd_started = 1;
#if PY_VERSION_HEX < 0x030C0000
        if (!sd_embedded && Py_IsInitialized() && PyCapsule_Type.tp_version_tag != 0) {
            /* a Python host whose capsule type cffi cannot use as its lock: it would hang */
            sd_start_status = -2;
        } else
#endif
        sd_start_status = cffi_start_python();
    }
    pthread_mutex_unlock(&sd_start_lock);
    __sync_synchronize();
    if (sd_ready)
        return 1;
    if (sd_start_status == -2)
        sd_fail(SD_ERR_INTERNAL, "%s: this process already runs Python, in a state where cffi's start-up would "
                "hang (Python < 3.12, e.g. after importing torch); use skipdeploy's Python API there", fn);
    else if (sd_start_status != 0)
        sd_fail(SD_ERR_INTERNAL, "%s: the embedded Python interpreter failed to start (its traceback is on "
                "stderr); rebuild the library with `skipdeploy capi --force` from a working environment", fn);
    else
        sd_fail(SD_ERR_INTERNAL, "%s: the embedded Python failed to start: %s", fn,
                sd_init_error[0] ? sd_init_error : "unknown error");
    return 0;
}

/* A status from the Python side, which adds SD_PY_BASE: anything else means it did not run. */
static sd_status sd_result(const char *fn, int raw)
{
    if (raw >= SD_PY_BASE + SD_OK && raw <= SD_PY_BASE + @MAX_STATUS@)
        return (sd_status)(raw - SD_PY_BASE);
    return sd_fail(SD_ERR_INTERNAL, "%s: the Python side did not run (got %d)", fn, raw);
}
"""


def comment(doc: str, indent: str = "") -> list[str]:
    """``doc`` as a C block comment, wrapped to the header's width."""
    lines = textwrap.wrap(doc, WIDTH - len(indent) - 8) or [""]
    out = [f"{indent}/* {lines[0]}"] + [f"{indent} * {line}" for line in lines[1:]]
    out[-1] += " */"
    return out


def _declarator(ctype: str, name: str) -> str:
    return f"{ctype}{'' if ctype.endswith('*') else ' '}{name}"


def prototype(f: Function, name: str | None = None, returns: str | None = None, semicolon: bool = True,
              width: int = WIDTH) -> str:
    """``f``'s C prototype, its parameters wrapped under the opening parenthesis."""
    opening = _declarator(returns or f.returns, name or f.name) + "("
    params = [p.decl for p in f.params] or ["void"]
    lines, line = [], opening
    for i, decl in enumerate(params):
        piece = decl + (", " if i < len(params) - 1 else ")" + (";" if semicolon else ""))
        if len(line + piece.rstrip()) > width and line != opening:
            lines.append(line.rstrip())
            line = " " * len(opening)
        line += piece
    return "\n".join(lines + [line])


def status_enum() -> list[str]:
    out = ["typedef enum {"]
    last = max(Status)
    for s in Status:
        item = f"    {s.name} = {int(s)}{'' if s is last else ','}"
        if not s.doc:
            out.append(item)
            continue
        pad = " " * 26
        lines = textwrap.wrap(s.doc, WIDTH - len(pad) - 6)
        out.append(f"{item.ljust(len(pad) - 1)} /* {lines[0]}" + (" */" if len(lines) == 1 else ""))
        out += [f"{pad}   {line}" for line in lines[1:]]
        if len(lines) > 1:
            out[-1] += " */"
    return out + ["} sd_status;"]


def header(version: str, functions: tuple[Function, ...] = FUNCTIONS) -> str:
    """The public header for library version ``version``."""
    body = []
    for t in TYPEDEFS:
        body += [*comment(t.doc), t.decl, ""]
    body += [*status_enum(), ""]
    for f in functions:
        body += [*comment(f.doc), prototype(f), ""]
    return HEAD.replace("@VERSION@", version) + "\n" + "\n".join(body) + "\n" + TAIL


def cdef(functions: tuple[Function, ...] = PYTHON_FUNCTIONS) -> str:
    """cffi's declarations: the types, one ``extern "Python"`` function per function that runs
    Python (its parameters are the exported function's), and the C helpers."""
    types = "\n".join(t.decl for t in TYPEDEFS)
    externs = "\n".join('extern "Python" ' + prototype(f, f.extern, "int", width=10**4) for f in functions)
    return f"\n{types}\n\n{externs}\n{HELPERS_CDEF}"


# -- the C wrappers ----------------------------------------------------------------------------------

def _fail(f: Function, status: str, message: str, *args: str) -> str:
    call = "sd_fail(" + ", ".join([status, f'"{f.name}: {message}"', *args]) + ")"
    return f"return {call};" if f.returns != "void" else f"{{ (void){call}; return; }}"


def _checks(f: Function) -> list[str]:
    """The C statements that check ``f``'s arguments, in the order the contract promises:
    outputs are reset first (so that a failure never leaves stale values), then each input in
    order, then the output buffer."""
    params = list(f.params)
    after = {p.name: params[i + 1] for i, p in enumerate(params[:-1])}
    first, inputs, last = [], [], []
    for p in params:
        if p.role == "out_len":
            first[:0] = [f"if ({p.name} == NULL)", "    " + _fail(f, "SD_ERR_INPUT", f"{p.name} is NULL"),
                         f"*{p.name} = 0;"]
        elif p.role == "handle_out":
            first += [f"if ({p.name} == NULL)", "    " + _fail(f, "SD_ERR_INPUT", f"{p.name} is NULL"),
                      f"*{p.name} = NULL;"]
        elif p.role == "text_out":
            first += [f"if ({p.name} != NULL && {after[p.name].name} > 0)", f"    {p.name}[0] = '\\0';"]
        if p.role in ("ids_out", "text_out"):
            cap = after[p.name].name
            last += [f"if ({p.name} == NULL && {cap} != 0)",
                     "    " + _fail(f, "SD_ERR_INPUT", f"{p.name} is NULL but {cap} is %zu", f"(size_t){cap}")]
        elif p.role == "rt":
            inputs += [f"if ({p.name} == NULL)", "    return;" if f.returns == "void" else
                       "    " + _fail(f, "SD_ERR_INPUT", f"{p.name} is NULL (get one from sd_load)")]
        elif p.role == "ids":
            n = after[p.name].name
            inputs += [f"if ({p.name} == NULL && {n} != 0)",
                       "    " + _fail(f, "SD_ERR_INPUT", f"{p.name} is NULL but {n} is %zu", f"(size_t){n}")]
        elif p.role in ("path", "text", "callback"):
            inputs += [f"if ({p.name} == NULL)", "    " + _fail(f, "SD_ERR_INPUT", f"{p.name} is NULL")]
    return first + inputs + last


def wrapper(f: Function) -> str:
    """The C definition of exported function ``f``."""
    if f.c_body is not None:
        return f"{prototype(f, semicolon=False)}\n{{\n{f.c_body}}}\n"
    call = f'sd_result("{f.name}", {f.extern}({", ".join(p.name for p in f.params)}))'
    lines = ["sd_error[0] = '\\0';", *_checks(f)]
    if f.returns == "void":
        lines += [f'if (!sd_start("{f.name}"))', "    return;", f"(void){call};"]
    else:
        lines += [f'if (!sd_start("{f.name}"))', "    return SD_ERR_INTERNAL;"]
        out = f.role("handle_out")
        if out is None:
            lines.append(f"return {call};")
        else:
            lines += [f"sd_status status = {call};", "if (status != SD_OK)", f"    *{out.name} = NULL;",
                      f"else if (*{out.name} == NULL)",
                      "    " + _fail(f, "SD_ERR_INTERNAL", "no handle was made"), "return status;"]
    body = "".join(f"    {line}\n" for line in lines)
    return f"{prototype(f, semicolon=False)}\n{{\n{body}}}\n"


def wrappers(program: str, functions: tuple[Function, ...] = FUNCTIONS) -> str:
    """The C of the library after the header: the runtime, then one wrapper per function.
    ``program`` is the interpreter's path as a C wide string literal."""
    declared = "".join(f"static {prototype(f, f.extern, 'int', width=10**4)}\n" for f in functions
                       if f.method is not None)
    runtime = (RUNTIME.replace("@PY_BASE@", str(PY_BASE)).replace("@MAX_STATUS@", max(Status).name)
               .replace("@PROGRAM@", program))
    return runtime + "\n/* Defined further down by cffi (the extern \"Python\" functions). */\n" + declared + \
        "\n" + "\n".join(wrapper(f) for f in functions)
