"""The C API: ``libskipdeploy.so`` (cffi embedding), its header and pkg-config file.

``skipdeploy.capi.build.build(out)`` (``skipdeploy capi --out DIR``) writes
DIR/lib/libskipdeploy.so, DIR/include/skipdeploy.h and DIR/lib/pkgconfig/skipdeploy.pc. The
functions behind the C calls are in ``bridge.py``; the header and the C wrappers in
``header.py``; the pkg-config file in ``pkgconfig.py``. See docs/c-api.md.
"""
