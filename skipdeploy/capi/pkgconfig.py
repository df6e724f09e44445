"""The pkg-config file of a C API build: ``DIR/lib/pkgconfig/skipdeploy.pc``.

Its ``Libs`` carry an rpath to ``DIR/lib``, so programs linked with
``pkg-config --libs skipdeploy`` find the library without ``LD_LIBRARY_PATH`` (under ``env -i``).
"""

from __future__ import annotations

from pathlib import Path

from ..errors import SkipDeployError


def pc_text(prefix: Path, version: str, python: str) -> str:
    """The .pc text for a build under ``prefix`` (an absolute path without whitespace)."""
    prefix = Path(prefix)
    if not prefix.is_absolute():
        raise SkipDeployError(f"the pkg-config prefix must be an absolute path (got {prefix})")
    if any(c.isspace() or c in "\"'\\$#" for c in str(prefix)):
        raise SkipDeployError(f"{prefix} holds whitespace or a quote, which pkg-config flags cannot carry; "
                              "build into a plainer path")
    return (f"prefix={prefix}\n"
            "libdir=${prefix}/lib\n"
            "includedir=${prefix}/include\n"
            "\n"
            "Name: skipdeploy\n"
            f"Description: C API of skipdeploy (SkipDecode OPT models with in-flight batching; embeds {python})\n"
            f"Version: {version}\n"
            "Cflags: -I${includedir}\n"
            "Libs: -L${libdir} -Wl,-rpath,${libdir} -lskipdeploy\n")


def write_pc(prefix: Path, version: str, python: str) -> Path:
    """Write ``prefix/lib/pkgconfig/skipdeploy.pc``; returns its path."""
    path = Path(prefix) / "lib" / "pkgconfig" / "skipdeploy.pc"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(pc_text(Path(prefix), version, python))
    return path
