"""The libpq that psycopg2 itself loaded, reached through ctypes.

Two uses: sending a cancel request without holding the GIL (``PQcancel``), and
driving a statement from the event loop (:mod:`pgpool_async._loop.native`).
Both must call the *same* libpq as psycopg2, since they pass it psycopg2's own
``PGconn *`` (``connection.pgconn_ptr``): a second copy of libpq in the process
(psycopg 3's wheel bundles one) has other structures and would crash.

How the library is found (Linux only; elsewhere :func:`libpq` is None and
callers use psycopg2's threads):

1. ``dlsym`` through psycopg2's extension module: a handle on ``_psycopg``
   resolves ``PQsendQuery`` in that module's own dependency tree, i.e. in the
   libpq it was linked against (a bundled ``libpq-<hash>.so`` in the binary
   wheel, the system one otherwise);
2. ``dladdr`` names the file that symbol lives in, and that file must be one of
   the libraries mapped into this process (``/proc/self/maps``);
3. its ``PQlibVersion()`` must equal ``psycopg2.extensions.libpq_version()``.

Any mismatch or failure makes :func:`libpq` return None, with the reason in
:func:`unavailable_reason`. Nothing is loaded at import time.

Two handles on the one file: :func:`libpq` (``ctypes.CDLL``: releases the GIL
during each call, for calls that may block, such as ``PQcancel``) and
:func:`libpq_gil` (``ctypes.PyDLL``: keeps the GIL, for the many short calls
that never wait — releasing and re-taking the GIL around each would cost more
than the call, and with busy worker threads could wait a whole switch interval).
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import threading

__all__ = ["libpq", "libpq_gil", "libpq_path", "unavailable_reason"]

_lock = threading.Lock()
_reason: str | None = None


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _mapped_files() -> set[str]:
    files = set()
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                files.add(parts[5].rstrip("\n"))
    return files


def _find() -> str:
    """The path of psycopg2's libpq; raises OSError with the reason otherwise."""
    if not sys.platform.startswith("linux"):
        raise OSError(f"the loop-native path is only built for Linux, not {sys.platform}")
    import psycopg2._psycopg as psycopg_ext
    import psycopg2.extensions

    ext = ctypes.CDLL(psycopg_ext.__file__)  # already loaded: the same handle
    try:
        address = ctypes.cast(ext.PQsendQuery, ctypes.c_void_p).value
    except AttributeError as exc:
        raise OSError("psycopg2's module does not resolve libpq's PQsendQuery") from exc
    libc = ctypes.CDLL(None)
    dladdr = libc.dladdr
    dladdr.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
    dladdr.restype = ctypes.c_int
    info = _DlInfo()
    if not dladdr(address, ctypes.byref(info)) or not info.dli_fname:
        raise OSError("dladdr could not name the file holding psycopg2's libpq")
    path = os.path.realpath(os.fsdecode(info.dli_fname))
    if path not in {os.path.realpath(f) for f in _mapped_files()}:
        raise OSError(f"{path} (psycopg2's libpq by dladdr) is not in /proc/self/maps")
    lib = ctypes.CDLL(path)
    lib.PQlibVersion.restype = ctypes.c_int
    lib.PQlibVersion.argtypes = []
    found = lib.PQlibVersion()
    wanted = psycopg2.extensions.libpq_version()
    if found != wanted:
        raise OSError(f"{path} is libpq {found}, psycopg2 uses {wanted}")
    return path


@functools.cache
def libpq_path() -> str | None:
    """The file of the libpq psycopg2 loaded, or None (see :func:`unavailable_reason`)."""
    global _reason
    with _lock:
        try:
            return _find()
        except (OSError, ImportError) as exc:
            _reason = str(exc)
            return None


def unavailable_reason() -> str | None:
    """Why :func:`libpq` is None, or None when it is available."""
    libpq_path()
    return _reason


@functools.cache
def libpq() -> ctypes.CDLL | None:
    """psycopg2's libpq, each call releasing the GIL; None when not found (cached)."""
    path = libpq_path()
    if path is None:
        return None
    lib = ctypes.CDLL(path)
    _prototypes(lib)
    return lib


@functools.cache
def libpq_gil() -> ctypes.PyDLL | None:
    """psycopg2's libpq, each call keeping the GIL: only for calls that never wait."""
    path = libpq_path()
    if path is None:
        return None
    lib = ctypes.PyDLL(path)
    _prototypes(lib)
    return lib


# -- prototypes ---------------------------------------------------------------------
# Pointers travel as c_void_p. PQgetvalue returns c_char_p: values in text format
# never contain a NUL byte, so one call yields the bytes (the hot path of row conversion).

_P = ctypes.c_void_p
_I = ctypes.c_int
_S = ctypes.c_char_p

_PROTOTYPES: dict[str, tuple[list[type], type | None]] = {
    # connection
    "PQstatus": ([_P], _I),
    "PQtransactionStatus": ([_P], _I),
    "PQsocket": ([_P], _I),
    "PQerrorMessage": ([_P], _S),
    "PQsetnonblocking": ([_P, _I], _I),
    "PQisnonblocking": ([_P], _I),
    "PQsslInUse": ([_P], _I),
    "PQsslStruct": ([_P, _S], _P),
    "PQgssEncInUse": ([_P], _I),
    "PQlibVersion": ([], _I),
    # sending and receiving
    "PQsendQuery": ([_P, _S], _I),
    "PQflush": ([_P], _I),
    "PQconsumeInput": ([_P], _I),
    "PQisBusy": ([_P], _I),
    "PQgetResult": ([_P], _P),
    "PQputCopyEnd": ([_P, _S], _I),
    "PQgetCopyData": ([_P, ctypes.POINTER(ctypes.c_char_p), _I], _I),
    "PQfreemem": ([_P], None),
    # results
    "PQresultStatus": ([_P], _I),
    "PQresultErrorMessage": ([_P], _S),
    "PQresultErrorField": ([_P, _I], _S),
    "PQclear": ([_P], None),
    "PQntuples": ([_P], _I),
    "PQnfields": ([_P], _I),
    "PQfname": ([_P, _I], _S),
    "PQftype": ([_P, _I], ctypes.c_uint),
    "PQfsize": ([_P, _I], _I),
    "PQfmod": ([_P, _I], _I),
    "PQftable": ([_P, _I], ctypes.c_uint),
    "PQftablecol": ([_P, _I], _I),
    "PQgetvalue": ([_P, _I, _I], _S),
    "PQgetisnull": ([_P, _I, _I], _I),
    "PQcmdStatus": ([_P], _S),
    "PQcmdTuples": ([_P], _S),
    "PQoidValue": ([_P], ctypes.c_uint),
    # cancel
    "PQgetCancel": ([_P], _P),
    "PQcancel": ([_P, _P, _I], _I),
    "PQfreeCancel": ([_P], None),
}


def _prototypes(lib: ctypes.CDLL) -> None:
    for name, (argtypes, restype) in _PROTOTYPES.items():
        func = getattr(lib, name)
        func.argtypes = argtypes
        func.restype = restype
