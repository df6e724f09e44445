"""The C API's text: the public header users include, and the C that the cffi build compiles.

``HEADER`` is written to ``DIR/include/skipdeploy.h``. ``CDEF`` declares, for cffi, the
functions implemented in Python (``extern "Python"``, in ``bridge.py``) and the C helpers Python
calls. ``WRAPPERS`` implements the exported ``sd_*`` functions in C: they check pointers, start
the embedded interpreter, and never report ``SD_OK`` unless the Python side really ran and said
so (a cffi ``extern "Python"`` function returns 0 when Python could not start; ours return
``SD_PY_BASE + status`` instead, and anything else becomes ``SD_ERR_INTERNAL``).
"""

from __future__ import annotations

HEADER = r"""/* skipdeploy.h: the C API of skipdeploy @VERSION@ (SkipDecode OPT models, in-flight batching).
 *
 * Link with `pkg-config --cflags --libs skipdeploy`. Every function is safe to call from many
 * threads at once; concurrent generations on one sd_runtime are batched by its in-flight engine.
 * Functions that return sd_status never abort the process: on failure sd_last_error() says why,
 * in one line. See docs/c-api.md for the JSON keys of options_json and params_json.
 */
#ifndef SKIPDEPLOY_H
#define SKIPDEPLOY_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SKIPDEPLOY_VERSION "@VERSION@"

/* A loaded export and its engine (an opaque handle, not a pointer to memory). */
typedef struct sd_runtime sd_runtime;

typedef enum {
    SD_OK = 0,
    SD_ERR_INPUT = 1,     /* bad argument: NULL pointer, bad JSON, unknown key, token id outside the
                             vocabulary, empty prompt, bad schedule, freed handle */
    SD_ERR_CAPACITY = 2,  /* does not fit: prompt + new tokens > max_length, queue full, memory */
    SD_ERR_EXPORT = 3,    /* sd_load: export missing, damaged or unsupported; backend unavailable */
    SD_ERR_BUFFER = 4,    /* out_capacity too small: *out_len says how much is needed */
    SD_ERR_INTERNAL = 5   /* anything else, including an embedded Python that failed to start */
} sd_status;

/* Called once per generated token, in order, on the calling thread; return non-zero to stop
 * (the request is cancelled and sd_generate_stream returns SD_OK). */
typedef int (*sd_token_fn)(int64_t token, void *user);

/* The library's version, e.g. "0.1.0" (never NULL, needs no initialisation). */
const char *sd_version(void);

/* "SD_OK", "SD_ERR_INPUT", ... ("SD_UNKNOWN" for other values). */
const char *sd_status_name(sd_status status);

/* Load an export directory and start its engine. options_json: NULL or a JSON object with
 * backend ("onnxruntime" or "torch"), device ("cpu"), threads, memory_limit (bytes),
 * check_files (verify sha256, default true), max_batch (16), max_queue (64), max_length,
 * prefill_chunk (64). On success *out is the handle; on failure *out is NULL. */
sd_status sd_load(const char *export_dir, const char *options_json, sd_runtime **out);

/* Generate from prompt token ids. params_json: NULL (the export's schedule, greedy, 32 new
 * tokens) or a JSON object with max_new_tokens, target_speedup or max_layers / min_layers /
 * warmup_layers / decay_tokens / prompt_layers (or full, table), temperature, top_k, top_p,
 * repetition_penalty, seed, stop (a string or a list of strings), stop_token_ids, ignore_eos.
 * Writes the generated ids (up to and including EOS; not the prompt) to out and their number
 * to *out_len. If out_capacity is too small: SD_ERR_BUFFER, *out_len is the number needed and
 * out holds the first out_capacity ids (out may be NULL when out_capacity is 0). */
sd_status sd_generate(sd_runtime *rt, const int64_t *prompt, size_t prompt_len, const char *params_json,
                      int64_t *out, size_t out_capacity, size_t *out_len);

/* As sd_generate, but calls fn(token, user) for each token as soon as it is generated. */
sd_status sd_generate_stream(sd_runtime *rt, const int64_t *prompt, size_t prompt_len, const char *params_json,
                             sd_token_fn fn, void *user);

/* Text in, text out (UTF-8; needs an export with a tokenizer). Writes the generated text
 * (without the prompt) NUL-terminated to out and its length in bytes, WITHOUT the NUL, to
 * *out_len: out_capacity must be at least *out_len + 1. If it is smaller: SD_ERR_BUFFER,
 * *out_len is still the text's length (allocate *out_len + 1 bytes) and out holds a
 * NUL-terminated prefix cut at a character boundary. An empty prompt is SD_ERR_INPUT. */
sd_status sd_generate_text(sd_runtime *rt, const char *prompt, const char *params_json,
                           char *out, size_t out_capacity, size_t *out_len);

/* The token ids of a text (as sd_generate_text would feed them: with the BOS token). Buffer
 * rules as sd_generate. */
sd_status sd_tokenize(sd_runtime *rt, const char *text, int64_t *out, size_t out_capacity, size_t *out_len);

/* The text of token ids. Buffer rules as sd_generate_text. */
sd_status sd_detokenize(sd_runtime *rt, const int64_t *ids, size_t ids_len, char *out, size_t out_capacity,
                        size_t *out_len);

/* A JSON object describing the runtime: version, export, num_layers, vocab_size, max_length,
 * eos_token_id, bos_token_id, pad_token_id, has_tokenizer, schedule, max_batch, max_queue,
 * backend. Buffer rules as sd_generate_text. */
sd_status sd_runtime_info(sd_runtime *rt, char *out, size_t out_capacity, size_t *out_len);

/* The message of this thread's last call that failed ("" after a call that succeeded); valid
 * until this thread's next call into the library. Never NULL. */
const char *sd_last_error(void);

/* Stop the engine (running generations finish first) and release the runtime. NULL is a no-op.
 * Call it once, after every call on rt has returned; rt is invalid afterwards. */
void sd_free(sd_runtime *rt);

#ifdef __cplusplus
}
#endif

#endif /* SKIPDEPLOY_H */
"""

# Offset of the statuses the Python side returns: a cffi ``extern "Python"`` function returns 0
# when the interpreter cannot run it, and 0 must never read as SD_OK.
PY_BASE = 0x5D00

CDEF = r"""
typedef struct sd_runtime sd_runtime;
typedef int (*sd_token_fn)(int64_t token, void *user);

extern "Python" int _sdpy_load(const char *, const char *, sd_runtime **);
extern "Python" int _sdpy_generate(sd_runtime *, const int64_t *, size_t, const char *, int64_t *, size_t, size_t *);
extern "Python" int _sdpy_stream(sd_runtime *, const int64_t *, size_t, const char *, sd_token_fn, void *);
extern "Python" int _sdpy_text(sd_runtime *, const char *, const char *, char *, size_t, size_t *);
extern "Python" int _sdpy_tokenize(sd_runtime *, const char *, int64_t *, size_t, size_t *);
extern "Python" int _sdpy_detokenize(sd_runtime *, const int64_t *, size_t, char *, size_t, size_t *);
extern "Python" int _sdpy_info(sd_runtime *, char *, size_t, size_t *);
extern "Python" int _sdpy_free(sd_runtime *);

void _sd_set_error(const char *message);
void _sd_set_ready(void);
void _sd_set_init_error(const char *message);
int _sd_embedded(void);
"""

# C compiled into the library after HEADER. @PROGRAM@ is the interpreter's path as a wide
# string literal, @PY_BASE@ the offset above.
WRAPPERS = r"""
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define SD_PY_BASE @PY_BASE@
#define SD_ERROR_SIZE 1024

/* Defined further down by cffi; documented as callable from set_source() code. */
static int cffi_start_python(void);
static int _sdpy_load(const char *, const char *, sd_runtime **);
static int _sdpy_generate(sd_runtime *, const int64_t *, size_t, const char *, int64_t *, size_t, size_t *);
static int _sdpy_stream(sd_runtime *, const int64_t *, size_t, const char *, sd_token_fn, void *);
static int _sdpy_text(sd_runtime *, const char *, const char *, char *, size_t, size_t *);
static int _sdpy_tokenize(sd_runtime *, const char *, int64_t *, size_t, size_t *);
static int _sdpy_detokenize(sd_runtime *, const int64_t *, size_t, char *, size_t, size_t *);
static int _sdpy_info(sd_runtime *, char *, size_t, size_t *);
static int _sdpy_free(sd_runtime *);

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
    if (raw >= SD_PY_BASE + SD_OK && raw <= SD_PY_BASE + SD_ERR_INTERNAL)
        return (sd_status)(raw - SD_PY_BASE);
    return sd_fail(SD_ERR_INTERNAL, "%s: the Python side did not run (got %d)", fn, raw);
}

#define SD_NEED(ptr, fn, what) \
    do { if ((ptr) == NULL) return sd_fail(SD_ERR_INPUT, "%s: %s is NULL", fn, what); } while (0)
#define SD_NEED_RT(rt, fn) \
    do { if ((rt) == NULL) return sd_fail(SD_ERR_INPUT, "%s: rt is NULL (get one from sd_load)", fn); } while (0)
#define SD_NEED_BUFFER(out, cap, fn) \
    do { if ((out) == NULL && (cap) != 0) \
        return sd_fail(SD_ERR_INPUT, "%s: out is NULL but out_capacity is %zu", fn, (size_t)(cap)); } while (0)

const char *sd_version(void) { return SKIPDEPLOY_VERSION; }

const char *sd_status_name(sd_status status)
{
    switch (status) {
    case SD_OK: return "SD_OK";
    case SD_ERR_INPUT: return "SD_ERR_INPUT";
    case SD_ERR_CAPACITY: return "SD_ERR_CAPACITY";
    case SD_ERR_EXPORT: return "SD_ERR_EXPORT";
    case SD_ERR_BUFFER: return "SD_ERR_BUFFER";
    case SD_ERR_INTERNAL: return "SD_ERR_INTERNAL";
    }
    return "SD_UNKNOWN";
}

const char *sd_last_error(void) { return sd_error; }

sd_status sd_load(const char *export_dir, const char *options_json, sd_runtime **out)
{
    sd_error[0] = '\0';
    SD_NEED(out, "sd_load", "out");
    *out = NULL;
    SD_NEED(export_dir, "sd_load", "export_dir");
    if (!sd_start("sd_load"))
        return SD_ERR_INTERNAL;
    sd_status status = sd_result("sd_load", _sdpy_load(export_dir, options_json, out));
    if (status != SD_OK)
        *out = NULL;
    else if (*out == NULL)
        return sd_fail(SD_ERR_INTERNAL, "sd_load: no handle was made");
    return status;
}

sd_status sd_generate(sd_runtime *rt, const int64_t *prompt, size_t prompt_len, const char *params_json,
                      int64_t *out, size_t out_capacity, size_t *out_len)
{
    sd_error[0] = '\0';
    SD_NEED(out_len, "sd_generate", "out_len");
    *out_len = 0;
    SD_NEED_RT(rt, "sd_generate");
    if (prompt == NULL && prompt_len != 0)
        return sd_fail(SD_ERR_INPUT, "sd_generate: prompt is NULL but prompt_len is %zu", prompt_len);
    SD_NEED_BUFFER(out, out_capacity, "sd_generate");
    if (!sd_start("sd_generate"))
        return SD_ERR_INTERNAL;
    return sd_result("sd_generate", _sdpy_generate(rt, prompt, prompt_len, params_json, out, out_capacity, out_len));
}

sd_status sd_generate_stream(sd_runtime *rt, const int64_t *prompt, size_t prompt_len, const char *params_json,
                             sd_token_fn fn, void *user)
{
    sd_error[0] = '\0';
    SD_NEED_RT(rt, "sd_generate_stream");
    if (prompt == NULL && prompt_len != 0)
        return sd_fail(SD_ERR_INPUT, "sd_generate_stream: prompt is NULL but prompt_len is %zu", prompt_len);
    SD_NEED(fn, "sd_generate_stream", "fn");
    if (!sd_start("sd_generate_stream"))
        return SD_ERR_INTERNAL;
    return sd_result("sd_generate_stream", _sdpy_stream(rt, prompt, prompt_len, params_json, fn, user));
}

sd_status sd_generate_text(sd_runtime *rt, const char *prompt, const char *params_json,
                           char *out, size_t out_capacity, size_t *out_len)
{
    sd_error[0] = '\0';
    SD_NEED(out_len, "sd_generate_text", "out_len");
    *out_len = 0;
    if (out != NULL && out_capacity > 0)
        out[0] = '\0';
    SD_NEED_RT(rt, "sd_generate_text");
    SD_NEED(prompt, "sd_generate_text", "prompt");
    SD_NEED_BUFFER(out, out_capacity, "sd_generate_text");
    if (!sd_start("sd_generate_text"))
        return SD_ERR_INTERNAL;
    return sd_result("sd_generate_text", _sdpy_text(rt, prompt, params_json, out, out_capacity, out_len));
}

sd_status sd_tokenize(sd_runtime *rt, const char *text, int64_t *out, size_t out_capacity, size_t *out_len)
{
    sd_error[0] = '\0';
    SD_NEED(out_len, "sd_tokenize", "out_len");
    *out_len = 0;
    SD_NEED_RT(rt, "sd_tokenize");
    SD_NEED(text, "sd_tokenize", "text");
    SD_NEED_BUFFER(out, out_capacity, "sd_tokenize");
    if (!sd_start("sd_tokenize"))
        return SD_ERR_INTERNAL;
    return sd_result("sd_tokenize", _sdpy_tokenize(rt, text, out, out_capacity, out_len));
}

sd_status sd_detokenize(sd_runtime *rt, const int64_t *ids, size_t ids_len, char *out, size_t out_capacity,
                        size_t *out_len)
{
    sd_error[0] = '\0';
    SD_NEED(out_len, "sd_detokenize", "out_len");
    *out_len = 0;
    if (out != NULL && out_capacity > 0)
        out[0] = '\0';
    SD_NEED_RT(rt, "sd_detokenize");
    if (ids == NULL && ids_len != 0)
        return sd_fail(SD_ERR_INPUT, "sd_detokenize: ids is NULL but ids_len is %zu", ids_len);
    SD_NEED_BUFFER(out, out_capacity, "sd_detokenize");
    if (!sd_start("sd_detokenize"))
        return SD_ERR_INTERNAL;
    return sd_result("sd_detokenize", _sdpy_detokenize(rt, ids, ids_len, out, out_capacity, out_len));
}

sd_status sd_runtime_info(sd_runtime *rt, char *out, size_t out_capacity, size_t *out_len)
{
    sd_error[0] = '\0';
    SD_NEED(out_len, "sd_runtime_info", "out_len");
    *out_len = 0;
    if (out != NULL && out_capacity > 0)
        out[0] = '\0';
    SD_NEED_RT(rt, "sd_runtime_info");
    SD_NEED_BUFFER(out, out_capacity, "sd_runtime_info");
    if (!sd_start("sd_runtime_info"))
        return SD_ERR_INTERNAL;
    return sd_result("sd_runtime_info", _sdpy_info(rt, out, out_capacity, out_len));
}

void sd_free(sd_runtime *rt)
{
    sd_error[0] = '\0';
    if (rt == NULL || !sd_start("sd_free"))
        return;
    (void)sd_result("sd_free", _sdpy_free(rt));
}
"""


def header(version: str) -> str:
    """The public header for library version ``version``."""
    return HEADER.replace("@VERSION@", version)
