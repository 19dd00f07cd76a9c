"""The one C part: pgpool_async._loop._pqfast, optional (see its source).

Everything else is in pyproject.toml. Where it cannot be compiled (no C compiler or
Python headers), the install goes on without it and the loop-native runner makes
the same libpq calls through ctypes.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "pgpool_async._loop._pqfast",
            ["pgpool_async/_loop/_pqfast.c"],
            optional=True,
        )
    ]
)
