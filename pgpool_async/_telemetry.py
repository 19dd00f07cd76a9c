"""What a pool tells the outside: which path its statements take, OpenTelemetry
spans and metrics, and the totals :mod:`pgpool_async.prometheus` exports.

One :class:`PoolTelemetry` per pool. :class:`~pgpool_async._loan.Loan` asks it
whether the loop path may take a connection (:meth:`PoolTelemetry.off_loop`:
log once at INFO with ``io="auto"``, :class:`PoolConfigError` with
``io="loop"``) and opens a span per statement (:meth:`PoolTelemetry.begin`);
the pool reports waits, loans, connects and timeouts to it.

OpenTelemetry is optional: without ``opentelemetry-api`` nothing is traced or
metered and nothing else changes. With the API but no SDK configured (no
tracer or meter provider set), each statement pays two attribute reads: the
check reads the API's global provider slots directly, since
``get_tracer_provider()`` also looks at ``os.environ`` on every call. An API
whose slots are not where this module looks (a future release) is treated as
not installed, with a log line, rather than guessed at.
"""

from __future__ import annotations

import functools
import logging
import time
import weakref
from collections.abc import Iterable
from typing import Any

from psycopg2.extensions import connection as PGConnection
from psycopg2.extensions import cursor as PGCursor

from ._loop.stats import PoolStats
from .errors import PoolConfigError

__all__ = [
    "METER_SLOT",
    "TRACE_SLOT",
    "PoolTelemetry",
    "is_plain_cursor_class",
    "sql_commenter",
    "statement_text",
]

logger = logging.getLogger("pgpool_async")

try:  # optional: the otel extra
    from opentelemetry import context as _otel_context
    from opentelemetry import metrics as _otel_metrics
    from opentelemetry import trace as _otel_trace
    from opentelemetry.metrics import _internal as _metrics_globals

    if not (hasattr(_otel_trace, "_TRACER_PROVIDER") and hasattr(_metrics_globals, "_METER_PROVIDER")):
        logger.info("pgpool_async: this opentelemetry-api keeps its providers elsewhere: telemetry is off")
        _otel_trace = None  # type: ignore[assignment]
except ImportError:  # (tests/test_telemetry.py runs a child process without it)
    _otel_trace = None  # type: ignore[assignment]


class _NoOpenTelemetry:
    """The API's global provider slots, when the API is not installed: never set."""

    _TRACER_PROVIDER = None
    _METER_PROVIDER = None


#: Where the API keeps the providers an app sets (``set_tracer_provider``,
#: ``set_meter_provider``): read by the hot path as plain attributes, no call.
TRACE_SLOT: Any = _otel_trace if _otel_trace is not None else _NoOpenTelemetry
METER_SLOT: Any = _metrics_globals if _otel_trace is not None else _NoOpenTelemetry

_SYSTEM = "postgresql"
_SCOPE = "pgpool_async"

# -- is anything listening? ------------------------------------------------------------


def _tracing_configured() -> bool:
    """A tracer provider was set (an SDK, or anything but the API's no-op)."""
    return TRACE_SLOT._TRACER_PROVIDER is not None


def _metering_configured() -> bool:
    """A meter provider was set."""
    return METER_SLOT._METER_PROVIDER is not None


def _wake_providers() -> None:
    """Let the API build providers named by ``OTEL_PYTHON_TRACER_PROVIDER`` /
    ``OTEL_PYTHON_METER_PROVIDER`` (it does so at the first ``get_*_provider()``
    call, which the per-statement check never makes). At ``open()``, once."""
    if _otel_trace is not None:
        _otel_trace.get_tracer_provider()
        _otel_metrics.get_meter_provider()


_tracer_cache: tuple[Any, Any] = (None, None)
_CLIENT = _otel_trace.SpanKind.CLIENT if _otel_trace is not None else None


def _tracer() -> Any:
    """The tracer of the global provider (cached while the provider stays; only
    called when one is set: :func:`_tracing_configured`)."""
    global _tracer_cache
    provider = TRACE_SLOT._TRACER_PROVIDER
    cached, tracer = _tracer_cache
    if provider is not cached:
        from . import __version__

        tracer = provider.get_tracer(_SCOPE, __version__)
        _tracer_cache = (provider, tracer)
    return tracer


# -- what a statement is called ------------------------------------------------------------


def statement_text(sql: Any) -> str | None:
    """The statement's template as given (never the parameter values), or None
    when it is a ``psycopg2.sql`` object (rendering it needs the connection)."""
    if isinstance(sql, str):
        return sql
    if isinstance(sql, bytes):
        return sql.decode("utf-8", "replace")
    return None


@functools.lru_cache(maxsize=1024)
def _operation(text: str) -> str:
    """The statement's first keyword, upper case (``SELECT``, ``WITH``...), or ""."""
    for line in text.lstrip().splitlines():
        line = line.strip()
        if line.startswith("--"):
            continue  # a leading comment line
        word = line.split(None, 1)[0] if line else ""
        return word.rstrip(";(").upper() if word.isascii() else ""
    return ""


# -- which connections the loop path takes -------------------------------------------------

_PLAIN_CURSORS: set[type] = {PGCursor}


def is_plain_cursor_class(cls: type) -> bool:
    """True for psycopg2's plain cursor and for OpenTelemetry's psycopg2
    instrumentation's ``TracedCursorFactory`` over it: its rows are psycopg2's
    plain tuples and its only addition, a span per statement, the pool makes
    itself (one span per statement, never two)."""
    if cls in _PLAIN_CURSORS:
        return True
    if (
        cls.__name__ == "TracedCursorFactory"
        and cls.__module__.startswith("opentelemetry.instrumentation.")
        and cls.__bases__ == (PGCursor,)
    ):
        _PLAIN_CURSORS.add(cls)  # (one class per instrumented connection: a bounded set in practice)
        return True
    return False


_COMMENTERS: dict[Any, Any] = {}


def sql_commenter(raw: PGConnection) -> Any:
    """The psycopg2 instrumentation's cursor tracer of ``raw``'s
    ``TracedCursorFactory`` when its SQL commenter is on (``enable_commenter=True``),
    else None. Found in the factory's ``execute`` closure, as the instrumentation
    keeps it there; a layout this does not recognise means no comment."""
    factory = raw.cursor_factory
    if factory is None or factory is PGCursor:
        return None
    try:
        return _COMMENTERS[factory]
    except (KeyError, TypeError):
        pass
    found = None
    for cell in getattr(getattr(factory, "execute", None), "__closure__", None) or ():
        try:
            tracer = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if getattr(tracer, "_commenter_enabled", False) and hasattr(
            tracer, "_update_args_with_added_sql_comment"
        ):
            found = tracer
            break
    if isinstance(factory, type) and is_plain_cursor_class(factory):
        _COMMENTERS[factory] = found  # (bounded as _PLAIN_CURSORS is)
    return found


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _psycopg2_own(cls: type) -> bool:
    """One of psycopg2's own classes (``psycopg2.extras`` connections and cursors:
    ``RealDictConnection``, ``LoggingConnection``, ``NamedTupleCursor``...)."""
    return cls.__module__.split(".", 1)[0] == "psycopg2"


def loop_refusal(raw: Any) -> tuple[str, bool] | None:
    """Why the loop path cannot run this connection's statements, and whether
    the reason is one of psycopg2's own classes (a documented thread-path
    feature: their rows and cursors are psycopg2's); None: it can."""
    kind = type(raw)
    if kind is not PGConnection:
        if issubclass(kind, PGConnection):  # (a proxy passes isinstance: it forwards __class__)
            # Its own cursor() or execute would not run on the loop path.
            return f"the connection class {_qualname(kind)} (psycopg2 runs its cursors)", _psycopg2_own(kind)
        return f"the connection is wrapped by {_qualname(kind)}, a proxy the pool does not know", False
    factory = raw.cursor_factory
    if factory is not None and not (isinstance(factory, type) and is_plain_cursor_class(factory)):
        if isinstance(factory, type):
            return f"the cursor_factory {_qualname(factory)} (psycopg2 builds its rows)", _psycopg2_own(
                factory
            )
        return f"the cursor_factory {factory!r} (psycopg2 builds its rows)", False
    return None


# -- one statement -------------------------------------------------------------------------


class _Statement:
    """One statement's span (or None) and start time, from :meth:`PoolTelemetry.begin`.
    ``attributes``: its metric attributes (shared by every statement of the same text
    on the same server: never changed in place)."""

    __slots__ = ("attributes", "error", "span", "started", "telemetry")

    def __init__(self, telemetry: PoolTelemetry, span: Any, attributes: dict[str, Any]) -> None:
        self.telemetry = telemetry
        self.span = span
        self.attributes = attributes
        self.error: BaseException | None = None
        self.started = time.perf_counter()

    def failed(self, exc: BaseException) -> None:
        self.error = exc

    def commented(self, sql: Any, commenter: Any) -> Any:
        """``sql`` with the instrumentation's SQL comment (``traceparent`` of this
        span, and what its ``commenter_options`` keep) appended, as its cursor would
        send it; ``sql`` unchanged if it is not a string or the comment fails."""
        if self.span is None or not isinstance(sql, str):
            return sql
        token = _otel_context.attach(_otel_trace.set_span_in_context(self.span))
        try:
            # (the cursor is only read for MySQL or a psycopg2.sql object, neither here)
            return commenter._update_args_with_added_sql_comment((sql,), None)[0]
        except Exception:  # the instrumentation changed: send the statement as written
            return sql
        finally:
            _otel_context.detach(token)

    def in_thread(self) -> Any:
        """Make this span current (and other instrumentation quiet) for a call
        handed to a thread, which copies the context: a psycopg2 instrumentation
        there (``Psycopg2Instrumentor``) then adds no second span. Returns the
        token for :meth:`out_of_thread`."""
        ctx = _otel_trace.set_span_in_context(self.span) if self.span is not None else None
        ctx = _otel_context.set_value(_otel_context._SUPPRESS_INSTRUMENTATION_KEY, True, ctx)
        return _otel_context.attach(ctx)

    @staticmethod
    def out_of_thread(token: Any) -> None:
        _otel_context.detach(token)

    def end(self) -> None:
        elapsed = time.perf_counter() - self.started
        attributes, exc, span = self.attributes, self.error, self.span
        if exc is not None:
            code = getattr(exc, "pgcode", None)
            # OpenTelemetry's conventions: the SQLSTATE where the server gave one.
            error_type = code or _qualname(type(exc))
            attributes = {**attributes, "error.type": error_type}
            if code:
                attributes["db.response.status_code"] = code
            if span is not None:
                span.set_attribute("error.type", error_type)
                if code:
                    span.set_attribute("db.response.status_code", code)
                if isinstance(exc, Exception):
                    span.record_exception(exc)
                span.set_status(_otel_trace.StatusCode.ERROR, f"{type(exc).__name__}")
        if span is not None:
            span.end()
        if METER_SLOT._METER_PROVIDER is not None:
            _instruments().operation_duration.record(elapsed, attributes)


# -- what a statement's span and points carry ------------------------------------------------

#: ``raw -> (db.namespace, server.address, server.port)``: fixed for a connection's life,
#: read once (``raw.info`` builds an object and decodes two strings at each call).
_SERVERS: weakref.WeakKeyDictionary[Any, tuple[str | None, str | None, int | None]] = (
    weakref.WeakKeyDictionary()
)
_NO_SERVER: tuple[None, None, None] = (None, None, None)


def _server(raw: Any) -> tuple[str | None, str | None, int | None]:
    """``raw``'s database, host and port (Nones for a closed connection)."""
    try:
        return _SERVERS[raw]
    except KeyError:
        cache = True
    except TypeError:  # not weakly referenceable: asked each time
        cache = False
    try:
        info = raw.info
        server = (info.dbname, info.host, info.port)
    except Exception:  # a closed connection: no server to name
        return _NO_SERVER
    if cache:
        _SERVERS[raw] = server
    return server


#: ``(statement text, server) -> (span name, span attributes, metric attributes)``:
#: built once per statement text and server, shared (never changed in place).
_SHAPES: dict[tuple[str | None, tuple[Any, ...]], tuple[str, dict[str, Any], dict[str, Any]]] = {}
_SHAPES_MAX = 2048


def _shape(
    text: str | None, server: tuple[str | None, str | None, int | None]
) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """A statement's span name and OpenTelemetry database attributes (those of the
    metric point leave out ``db.query.text``: unbounded)."""
    key = (text, server)
    shape = _SHAPES.get(key)
    if shape is not None:
        return shape
    namespace, host, port = server
    operation = _operation(text) if text else ""
    attributes: dict[str, Any] = {"db.system.name": _SYSTEM}
    if namespace:
        attributes["db.namespace"] = namespace
    if operation:
        attributes["db.operation.name"] = operation
    if host:
        attributes["server.address"] = host
        if port:
            attributes["server.port"] = port
    name = f"{operation} {namespace}" if operation and namespace else operation or namespace or _SYSTEM
    span_attributes = attributes if text is None else {**attributes, "db.query.text": text}
    shape = (name, span_attributes, attributes)
    if len(_SHAPES) >= _SHAPES_MAX:  # (texts built with their values inlined: start again)
        _SHAPES.clear()
    _SHAPES[key] = shape
    return shape


# -- one pool ------------------------------------------------------------------------------


class PoolTelemetry:
    """One pool's statement paths, spans and metrics (see the module docstring)."""

    __slots__ = (
        "__weakref__",
        "_told",
        "create_count",
        "create_seconds",
        "enabled",
        "exported",
        "io",
        "name",
        "pool",
        "stats",
        "timeouts",
        "use_count",
        "use_seconds",
        "wait_count",
        "wait_seconds",
    )

    def __init__(self, name: str, io: str, stats: PoolStats, enabled: bool = True) -> None:
        self.name = name
        self.io = io
        self.stats = stats
        self.enabled = bool(enabled) and _otel_trace is not None
        self.exported = False  # a Prometheus collector reads the totals below
        self.pool: Any = None  # weakref.ref to the pool while it is open (metrics read it)
        self._told: set[str] = set()  # the reasons logged (io="auto"), once each
        # Monotonic totals (never reset by pop_stats): what the exporters read.
        self.timeouts = 0
        self.wait_count = self.use_count = self.create_count = 0
        self.wait_seconds = self.use_seconds = self.create_seconds = 0.0

    # -- the path ------------------------------------------------------------------

    def off_loop(self, raw: Any) -> bool:
        """Asked when ``raw`` is not a plain psycopg2 connection with no
        ``cursor_factory``: True when its statements must run in threads (logged
        once per pool and reason at INFO, logger ``pgpool_async``). psycopg2's
        own connection and cursor classes (``psycopg2.extras``) run in threads
        by design, whatever ``io``; OpenTelemetry's ``TracedCursorFactory`` stays
        on the loop (False).

        :raises PoolConfigError: with ``io="loop"``, for a class the pool does not
            know (a proxy, a subclass of your own, another cursor factory), naming
            it, instead of running on threads.
        """
        refusal = loop_refusal(raw)
        if refusal is None:
            return False
        reason, known = refusal
        if self.io == "loop" and not known:
            raise PoolConfigError(
                f'pool {self.name!r} has io="loop", but the loop path cannot run statements on this '
                f'connection: {reason}. Use io="auto" to run them in threads, or drop the wrapper'
            )
        if reason not in self._told:
            self._told.add(reason)
            logger.info(
                "pool %r: statements run in worker threads, not on the event loop: %s", self.name, reason
            )
        return True

    # -- spans ---------------------------------------------------------------------

    def live(self) -> bool:
        """Worth a :meth:`begin`: telemetry on and a tracer or meter provider set
        (:meth:`Loan._run <pgpool_async._loan.Loan._run>` inlines this test)."""
        return self.enabled and (
            TRACE_SLOT._TRACER_PROVIDER is not None or METER_SLOT._METER_PROVIDER is not None
        )

    def begin(self, raw: PGConnection, sql: Any) -> _Statement:
        """Start a statement's span (a child of the caller's current span) with
        OpenTelemetry's database attributes; :meth:`_Statement.end` ends it."""
        name, span_attributes, attributes = _shape(
            sql if type(sql) is str else statement_text(sql), _server(raw)
        )
        span = None
        if TRACE_SLOT._TRACER_PROVIDER is not None:
            span = _tracer().start_span(name, kind=_CLIENT, attributes=span_attributes)
            if not span.is_recording():
                span = None
        return _Statement(self, span, attributes)

    # -- pool metrics --------------------------------------------------------------

    def metering(self) -> bool:
        """Worth timing checkouts: an exporter reads the totals, or a meter provider is set."""
        if self.enabled and METER_SLOT._METER_PROVIDER is not None:
            _instruments()  # (the gauges too, for a provider set after open())
            return True
        return self.exported

    def waited(self, seconds: float) -> None:
        self.wait_count += 1
        self.wait_seconds += seconds
        self._record("wait_time", seconds)

    def used(self, seconds: float) -> None:
        self.use_count += 1
        self.use_seconds += seconds
        self._record("use_time", seconds)

    def connected(self, seconds: float) -> None:
        self.create_count += 1
        self.create_seconds += seconds
        self._record("create_time", seconds)

    def timed_out(self) -> None:
        self.timeouts += 1
        if self.enabled and _metering_configured():
            _instruments().timeouts.add(1, {"db.client.connection.pool.name": self.name})

    def _record(self, which: str, seconds: float) -> None:
        if self.enabled and _metering_configured():
            getattr(_instruments(), which).record(seconds, {"db.client.connection.pool.name": self.name})

    def opened(self, pool: Any) -> None:
        """The pool opened: its gauges are observed from now on (no-op when off)."""
        self.pool = weakref.ref(pool)
        if self.enabled:
            _wake_providers()
            if _metering_configured():
                _instruments()
            _OBSERVED.add(self)

    def gauges(self) -> dict[str, int] | None:
        """The pool's gauges now (None once the pool is gone): used, idle, max,
        idle_min, idle_max, pending."""
        pool = self.pool() if self.pool is not None else None
        if pool is None or pool.closed:
            return None
        stats = pool.get_stats()
        size, available = stats.get("pool_size", 0), stats.get("pool_available", 0)
        return {
            "used": max(size - available, 0),
            "idle": available,
            "max": pool.maxconn,
            "idle_min": pool.minconn,
            "idle_max": pool.maxconn,
            "pending": stats.get("requests_waiting", 0),
        }


_OBSERVED: weakref.WeakSet[PoolTelemetry] = weakref.WeakSet()


# -- OpenTelemetry instruments (one set per process) ---------------------------------------


class _Instruments:
    """OpenTelemetry's database client instruments, on one meter provider."""

    def __init__(self, provider: Any) -> None:
        from . import __version__

        meter = provider.get_meter(_SCOPE, __version__)
        self.operation_duration = meter.create_histogram(
            "db.client.operation.duration", unit="s", description="Duration of database client operations."
        )
        self.create_time = meter.create_histogram(
            "db.client.connection.create_time",
            unit="s",
            description="The time it took to create a new connection.",
        )
        self.wait_time = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="The time it took to obtain an open connection from the pool.",
        )
        self.use_time = meter.create_histogram(
            "db.client.connection.use_time",
            unit="s",
            description="The time between borrowing a connection and returning it to the pool.",
        )
        self.timeouts = meter.create_counter(
            "db.client.connection.timeouts",
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to obtain a connection.",
        )
        gauges = (
            ("db.client.connection.count", "{connection}", "Connections currently in the state described."),
            ("db.client.connection.max", "{connection}", "The maximum number of open connections allowed."),
            ("db.client.connection.idle.max", "{connection}", "The maximum number of idle open connections."),
            ("db.client.connection.idle.min", "{connection}", "The minimum number of idle open connections."),
            (
                "db.client.connection.pending_requests",
                "{request}",
                "The number of current pending requests for an open connection.",
            ),
        )
        for name, unit, description in gauges:
            if name == "db.client.connection.count" or name == "db.client.connection.pending_requests":
                meter.create_observable_up_down_counter(
                    name, [functools.partial(_observe, name)], unit=unit, description=description
                )
            else:
                meter.create_observable_gauge(
                    name, [functools.partial(_observe, name)], unit=unit, description=description
                )


_KEYS = {
    "db.client.connection.max": "max",
    "db.client.connection.idle.max": "idle_max",
    "db.client.connection.idle.min": "idle_min",
    "db.client.connection.pending_requests": "pending",
}


def _observe(name: str, options: Any) -> Iterable[Any]:
    """The observable instruments' callback: one value per open pool."""
    from opentelemetry.metrics import Observation

    for telemetry in list(_OBSERVED):
        gauges = telemetry.gauges()
        if gauges is None:
            continue
        pool_name = {"db.client.connection.pool.name": telemetry.name}
        if name == "db.client.connection.count":
            for state in ("idle", "used"):
                yield Observation(gauges[state], {**pool_name, "db.client.connection.state": state})
        else:
            yield Observation(gauges[_KEYS[name]], pool_name)


_instruments_cache: tuple[Any, _Instruments | None] = (None, None)


def _instruments() -> _Instruments:
    """The instruments of the meter provider set now (made at its first use, once
    per provider: a provider set later gets its own, gauges included). Only
    called when one is set (:func:`_metering_configured`)."""
    global _instruments_cache
    provider = _metrics_globals._METER_PROVIDER
    cached, instruments = _instruments_cache
    if provider is not cached or instruments is None:
        instruments = _Instruments(provider)
        _instruments_cache = (provider, instruments)
    return instruments
