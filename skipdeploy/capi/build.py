"""Build the C library with cffi's embedding support: ``DIR/lib/libskipdeploy.so``, its header and
its pkg-config file.

The library's exported ``sd_*`` functions are C, generated with the header from the table in
``functions.py`` (``header.wrappers``); they start an embedded Python interpreter on first use
and call the ``extern "Python"`` functions that ``bridge.install`` binds. It
must run in a process with an empty environment (``env -i``), so the build bakes in the
interpreter that runs it:

- it links to that interpreter's own libpython through an rpath to ``sysconfig`` LIBDIR (a
  DT_RPATH, which ``LD_LIBRARY_PATH`` cannot override): another libpython of the same minor
  version, such as the distribution's, would load without error and break parts of the standard
  library;
- a constructor sets the program name to ``sys.executable`` before the interpreter starts, so
  that it finds the virtual environment (``pyvenv.cfg``: ``sys.prefix``, site-packages, cffi's
  ``_cffi_backend``);
- the init code checks ``sys.version`` against the build's, puts the build's ``sys.path``
  entries first (belt and braces), sets ``sys.executable``, then installs the bridge. If any of
  that fails, every call returns ``SD_ERR_INTERNAL`` and ``sd_last_error`` says why.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import SkipDeployError
from .functions import FUNCTIONS
from .header import cdef, header, wrappers
from .pkgconfig import pc_text

MODULE = "_skipdeploy_capi"
LIBRARY = "libskipdeploy.so"

INIT_CODE = r'''
import sys
from _skipdeploy_capi import ffi, lib


def _sd_init():
    want = @VERSION@
    if sys.version != want:
        raise RuntimeError("this library was built for Python %s and runs under Python %s (%s): a different "
                           "libpython was loaded; rebuild it with `skipdeploy capi --force` from the Python you run"
                           % (want.split()[0], sys.version.split()[0], sys.executable))
    paths = [p for p in @PATHS@ if p not in sys.path]
    if lib._sd_embedded():           # we started this interpreter: it is ours to set up
        sys.path[:0] = paths
        sys.executable = @EXECUTABLE@
    else:                            # a Python host: leave its paths first
        sys.path.extend(paths)
    from skipdeploy.capi import bridge
    bridge.install(ffi, lib)


try:
    _sd_init()
except BaseException as exc:
    message = " ".join(("%s: %s" % (type(exc).__name__, exc)).split())
    lib._sd_set_init_error(message.encode("utf-8", "replace")[:1000])
else:
    lib._sd_set_ready()
'''


@dataclass
class BuildResult:
    library: Path
    header: Path
    pkgconfig: Path
    python: str
    seconds: float


def compiler() -> str:
    """The C compiler the build uses (``$CC``, else the one Python was built with, else ``cc``),
    or a SkipDeployError if there is none."""
    command = os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"
    name = shlex.split(command)[0] if command.strip() else "cc"
    if shutil.which(name) is None:
        raise SkipDeployError(f"no C compiler: {name!r} is not on PATH; install one (e.g. gcc) or set CC")
    return command


def libpython() -> Path:
    """The shared libpython of this interpreter, or a SkipDeployError if it has none."""
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("LDLIBRARY") or ""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not libdir or not name.endswith(".so") \
            or not (Path(libdir) / name).exists():
        raise SkipDeployError(f"this Python ({sys.executable}) has no shared libpython (built without "
                              "--enable-shared), which a C library that embeds it needs; use a Python that has one "
                              "(e.g. pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)")
    return Path(libdir) / name


def _wide_literal(text: str) -> str:
    r"""``text`` as a C wide string literal (``L"..."``), non-ASCII as \U escapes."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif 32 <= ord(ch) < 127:
            out.append(ch)
        else:
            out.append(f"\\U{ord(ch):08x}")
    return 'L"' + "".join(out) + '"'


def version_script() -> str:
    """The linker's version script: the table's functions are the library's only symbols."""
    return "{ global: " + " ".join(f"{f.name};" for f in FUNCTIONS) + " local: *; };\n"


def build_paths() -> list[str]:
    """The import paths baked into the library: skipdeploy's own parent first, then this
    process's absolute ``sys.path`` entries."""
    import skipdeploy

    paths = [str(Path(skipdeploy.__file__).resolve().parent.parent)]
    for p in sys.path:
        if p and os.path.isabs(p) and os.path.exists(p) and p not in paths:
            paths.append(p)
    return paths


def build(out: str | Path, force: bool = False, verbose: bool = False) -> BuildResult:
    """Build the C library under ``out``: lib/libskipdeploy.so, include/skipdeploy.h and
    lib/pkgconfig/skipdeploy.pc. Refuses to replace an earlier build unless ``force``."""
    start = time.perf_counter()
    try:
        import cffi
    except ImportError:
        raise SkipDeployError("building the C library needs cffi; pip install 'skipdeploy[capi]'") from None
    compiler()
    libdir = str(libpython().parent)
    out = Path(out).expanduser().resolve()
    library, include, pc = out / "lib" / LIBRARY, out / "include" / "skipdeploy.h", \
        out / "lib" / "pkgconfig" / "skipdeploy.pc"
    pc_body = pc_text(out, __version__, f"Python {sys.version.split()[0]} at {sys.executable}")  # checks the path
    existing = [p for p in (library, include, pc) if p.exists()]
    if existing and not force:
        raise SkipDeployError(f"{out} already holds a build of the C library ({existing[0].name}); "
                              "pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise SkipDeployError(f"{out} exists and is not a directory")

    text = header(__version__)
    init = (INIT_CODE.replace("@VERSION@", repr(sys.version)).replace("@PATHS@", repr(build_paths()))
            .replace("@EXECUTABLE@", repr(sys.executable)))
    source = text + wrappers(_wide_literal(sys.executable))
    ffi = cffi.FFI()
    ffi.cdef(cdef())
    ffi.embedding_init_code(init)
    with tempfile.TemporaryDirectory(prefix="skipdeploy-capi-") as tmp:
        script = Path(tmp) / "exports.map"
        script.write_text(version_script())
        ffi.set_source(MODULE, source, library_dirs=[libdir],
                       extra_compile_args=["-Wno-unused-function"],
                       extra_link_args=[f"-L{libdir}", "-Wl,--disable-new-dtags", f"-Wl,-rpath,{libdir}",
                                        f"-Wl,-soname,{LIBRARY}", f"-Wl,--version-script,{script}"])
        try:
            built = Path(ffi.compile(tmpdir=tmp, target=LIBRARY, verbose=verbose))
        except Exception as exc:  # the compiler's own output is on stderr
            raise SkipDeployError(f"the C build failed ({type(exc).__name__}: {' '.join(str(exc).split())}); "
                                  "run `skipdeploy capi --verbose` to see the compiler's commands") from None
        for path in (library.parent, include.parent, pc.parent):
            path.mkdir(parents=True, exist_ok=True)
        staged = library.with_name(f".{LIBRARY}.{os.getpid()}")
        shutil.copyfile(built, staged)
        os.chmod(staged, 0o755)
        os.replace(staged, library)  # a new inode: processes that loaded the old one keep it
    include.write_text(text)
    pc.write_text(pc_body)
    return BuildResult(library, include, pc, sys.executable, time.perf_counter() - start)
