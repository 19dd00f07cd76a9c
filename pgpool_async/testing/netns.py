"""Real network faults: a PostgreSQL server behind a router, in network namespaces.

:class:`NetLab` builds, as root, two network namespaces of its own and three
addresses in ``10.200.N.0/29`` (N picked free)::

    this process (root namespace)  pgpNa 10.200.N.1/30
        |  veth
    router namespace "pgpoolNr"    pgpNb 10.200.N.2/30   pgpNc 10.200.N.5/30
        |  veth
    server namespace "pgpoolNs"    pgpNd 10.200.N.6/30   PostgreSQL (ThrowawayPostgres)

Faults are iptables rules in the router's ``raw PREROUTING`` chain: packets are
dropped on *ingress* (both ways for a blackhole, towards the server by default
for loss), so neither end's kernel sees a local
error (a drop in OUTPUT would, and TCP would then retry fast and fake a
recovery). Loss uses ``-m statistic``; latency uses ``tc netem`` when the kernel
has it (:meth:`NetLab.latency` raises :class:`NetLabUnavailable` otherwise).

Every fault is also lifted by an independent timer, a separate ``sh`` process,
after ``lift_after`` seconds: a frozen test cannot keep a fault in place.
:meth:`NetLab.destroy` (or the ``with`` block's end, or ``atexit``) stops the
server and deletes the namespaces and the veth pairs (and with them every rule
and route). Only namespaces, links and addresses it created are ever touched.

:func:`unavailable` says why a lab cannot be built here (not root, no ``ip`` or
``iptables``, namespaces refused), or None.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TypeVar

from .throwaway import ThrowawayError, ThrowawayPostgres

__all__ = ["NetLab", "NetLabError", "NetLabUnavailable", "unavailable"]

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_PREFIX = "pgpool"
_PORT = 5432


class NetLabError(RuntimeError):
    """A command that builds or changes the lab failed (the message has its output)."""


class NetLabUnavailable(NetLabError):
    """This machine cannot run the lab, or this fault (the message says why)."""


def _run(*argv: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise NetLabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def unavailable() -> str | None:
    """Why a :class:`NetLab` cannot be built here, or None if it can."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    for tool in ("ip", "iptables", "sh"):
        if shutil.which(tool) is None:
            return f"{tool!r} is not installed (apt-get install -y iproute2 iptables)"
    name = f"{_PREFIX}probe{os.getpid()}"
    proc = _run("ip", "netns", "add", name, check=False)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    try:
        rule = _run(
            "ip",
            "netns",
            "exec",
            name,
            "iptables",
            "-t",
            "raw",
            "-A",
            "PREROUTING",
            "-j",
            "DROP",
            check=False,
        )
        if rule.returncode != 0:
            return f"iptables cannot add a raw PREROUTING rule in a namespace: {rule.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", name, check=False)
    return None


def _in_namespace(name: str, func: Callable[[], T]) -> T:
    """Run ``func`` in a thread moved into namespace ``name``: processes it starts
    (a postmaster) live there. The thread ends afterwards; no other is moved."""
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: list[Any] = []

    def body() -> None:
        try:
            fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise NetLabError(f"setns({name}) failed: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome.append((True, func()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=body, name=f"netlab-{name}", daemon=True)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


class _NamespacedPostgres(ThrowawayPostgres):
    """A throwaway server listening on the server namespace's address."""

    def __init__(self, lab: NetLab, settings: Mapping[str, str]) -> None:
        super().__init__(port=_PORT, settings={**settings, "listen_addresses": lab.server_ip})
        self._lab = lab

    @property
    def dsn(self) -> str:
        return f"host={self._lab.server_ip} port={self.port} user=postgres dbname=postgres"

    def start(self) -> ThrowawayPostgres:
        return _in_namespace(self._lab.server_ns, super().start)

    def _initdb(self) -> None:
        super()._initdb()
        # initdb trusts loopback only; the clients come through the router.
        with open(os.path.join(self.data_dir, "pg_hba.conf"), "a", encoding="utf-8") as hba:
            hba.write(f"\nhost all all 10.200.{self._lab.n}.0/29 trust\n")


class NetLab:
    """A throwaway PostgreSQL behind a router namespace whose ingress can drop,
    lose or delay packets. The constructor does no I/O; :meth:`start` builds it.

    Args:
        settings: server settings for :class:`ThrowawayPostgres`.
        max_fault: every fault is lifted after at most this many seconds.
    """

    def __init__(self, settings: Mapping[str, str] | None = None, max_fault: float = 120.0) -> None:
        self._settings = dict(settings or {"max_connections": "100"})
        self.max_fault = max_fault
        self._n: int | None = None
        self._server: _NamespacedPostgres | None = None
        self._timers: list[subprocess.Popen[bytes]] = []
        self._netem = False
        self._lock = threading.Lock()

    # -- names and addresses ----------------------------------------------------------

    @property
    def n(self) -> int:
        """The lab's number, which its namespaces, links and addresses carry.

        :raises NetLabError: the lab is not built (``start()`` not called).
        """
        if self._n is None:
            raise NetLabError("the lab is not built: call start() first")
        return self._n

    @property
    def router_ns(self) -> str:
        """The router's network namespace (where packets are dropped)."""
        return f"{_PREFIX}{self.n}r"

    @property
    def server_ns(self) -> str:
        """The PostgreSQL server's network namespace."""
        return f"{_PREFIX}{self.n}s"

    @property
    def server_ip(self) -> str:
        """The server's address, as clients outside the namespaces reach it."""
        return f"10.200.{self.n}.6"

    def _link(self, letter: str) -> str:
        return f"pgp{self.n}{letter}"

    @property
    def server(self) -> ThrowawayPostgres:
        """The server (started by :meth:`start`)."""
        if self._server is None:
            raise NetLabError("the lab is not built: call start() first")
        return self._server

    @property
    def dsn(self) -> str:
        """How to reach the server from this process: through the router."""
        return self.server.dsn

    # -- building and tearing down ----------------------------------------------------------

    def start(self) -> NetLab:
        """Build the namespaces, links and routes, and start the server.

        :raises NetLabUnavailable: see :func:`unavailable`.
        :raises NetLabError: a command failed (everything built is removed).
        """
        reason = unavailable()
        if reason is not None:
            raise NetLabUnavailable(reason)
        self._claim_number()
        atexit.register(self.destroy)
        try:
            self._build()
            self._server = _NamespacedPostgres(self, self._settings)
            self._server.start()
        except BaseException:
            self.destroy()
            raise
        return self

    def _claim_number(self) -> None:
        in_use = _run("ip", "-4", "-o", "addr").stdout + _run("ip", "-4", "route").stdout
        existing = set(_run("ip", "netns", "list").stdout.split())
        for n in range(20, 250):
            if f"10.200.{n}." in in_use or f"{_PREFIX}{n}r" in existing:
                continue
            # Creating the namespace claims the number (fails if another lab won the race).
            if _run("ip", "netns", "add", f"{_PREFIX}{n}r", check=False).returncode == 0:
                self._n = n
                return
        raise NetLabError("no free 10.200.N.0/29 range and namespace name")

    def _build(self) -> None:
        n, r, s = self.n, self.router_ns, self.server_ns
        a, b, c, d = (self._link(x) for x in "abcd")
        net = f"10.200.{n}"
        _run("ip", "netns", "add", s)
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        _run("ip", "link", "set", b, "netns", r)
        _run("ip", "addr", "add", f"{net}.1/30", "dev", a)
        _run("ip", "link", "set", a, "up")
        _run("ip", "netns", "exec", r, "ip", "link", "add", c, "type", "veth", "peer", "name", d)
        _run("ip", "netns", "exec", r, "ip", "link", "set", d, "netns", s)
        for ns, link, addr in ((r, b, f"{net}.2/30"), (r, c, f"{net}.5/30"), (s, d, f"{net}.6/30")):
            _run("ip", "netns", "exec", ns, "ip", "addr", "add", addr, "dev", link)
            _run("ip", "netns", "exec", ns, "ip", "link", "set", link, "up")
        _run("ip", "netns", "exec", r, "ip", "link", "set", "lo", "up")
        _run("ip", "netns", "exec", s, "ip", "link", "set", "lo", "up")
        # /proc/sys/net is the namespace's own (no procps needed for sysctl).
        _run("ip", "netns", "exec", r, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        _run("ip", "netns", "exec", s, "ip", "route", "add", "default", "via", f"{net}.5")
        _run("ip", "route", "add", f"{net}.4/30", "via", f"{net}.2", "dev", a)

    def destroy(self) -> None:
        """Lift every fault, stop the server, delete what :meth:`start` built. Safe twice."""
        with self._lock:
            self._stop_timers()
            server, self._server = self._server, None
            if server is not None:
                with contextlib.suppress(ThrowawayError, OSError):
                    server.destroy()
            if self._n is not None:
                _run("ip", "link", "del", self._link("a"), check=False)  # its route goes with it
                _run("ip", "netns", "del", self.server_ns, check=False)
                _run("ip", "netns", "del", self.router_ns, check=False)
                self._n = None
        atexit.unregister(self.destroy)

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    # -- faults --------------------------------------------------------------------------

    def _iptables(self, *rule: str) -> None:
        _run("ip", "netns", "exec", self.router_ns, "iptables", "-w", "-t", "raw", *rule)

    def _arm_timer(self, lift_after: float | None) -> None:
        """Lift every fault after ``lift_after`` seconds from a separate process."""
        seconds = self.max_fault if lift_after is None else min(lift_after, self.max_fault)
        script = (
            f"sleep {seconds:.3f}; "
            f"ip netns exec {self.router_ns} iptables -w -t raw -F PREROUTING; "
            f"ip netns exec {self.router_ns} tc qdisc del dev {self._link('b')} root 2>/dev/null; "
            f"ip netns exec {self.router_ns} tc qdisc del dev {self._link('c')} root 2>/dev/null; true"
        )
        timer = subprocess.Popen(
            ["sh", "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._timers.append(timer)

    def _stop_timers(self) -> None:
        timers, self._timers = self._timers, []
        for timer in timers:
            if timer.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(timer.pid, signal.SIGKILL)  # its own session: the sh and its sleep
            timer.wait()

    def blackhole(self, lift_after: float | None = None) -> None:
        """Drop every TCP packet through the router, both ways, from now on."""
        self._iptables("-A", "PREROUTING", "-p", "tcp", "-j", "DROP")
        self._arm_timer(lift_after)

    def loss(self, probability: float, lift_after: float | None = None, both_ways: bool = False) -> None:
        """Drop each TCP packet towards the server (also back, with ``both_ways``)
        with this probability (0..1).

        One way is a server namespace dropping on its own ingress: a segment or
        its ACK is lost with ``probability``. Both ways, a round trip fails with
        ``1 - (1 - p)**2`` (51% at 30%).
        """
        if not 0 < probability < 1:
            raise ValueError(f"probability must be in (0, 1), got {probability!r}")
        where = () if both_ways else ("-i", self._link("b"))
        self._iptables(
            "-A", "PREROUTING", *where, "-p", "tcp", "-m", "statistic", "--mode", "random",
            "--probability", f"{probability:.4f}", "-j", "DROP",
        )  # fmt: skip
        self._arm_timer(lift_after)

    def latency(self, delay_ms: float, lift_after: float | None = None) -> None:
        """Delay every packet through the router by ``delay_ms`` each way (``tc netem``).

        :raises NetLabUnavailable: the kernel has no ``sch_netem``.
        """
        for link in (self._link("b"), self._link("c")):
            proc = _run(
                "ip", "netns", "exec", self.router_ns, "tc", "qdisc", "add", "dev", link,
                "root", "netem", "delay", f"{delay_ms:.1f}ms", check=False,
            )  # fmt: skip
            if proc.returncode != 0:
                self.heal()
                raise NetLabUnavailable(f"tc netem is not available here: {proc.stderr.strip()}")
        self._netem = True
        self._arm_timer(lift_after)

    def heal(self) -> None:
        """Lift every fault now."""
        self._stop_timers()
        if self._n is None:
            return
        self._iptables("-F", "PREROUTING")
        if self._netem:
            for link in (self._link("b"), self._link("c")):
                _run(
                    "ip",
                    "netns",
                    "exec",
                    self.router_ns,
                    "tc",
                    "qdisc",
                    "del",
                    "dev",
                    link,
                    "root",
                    check=False,
                )
            self._netem = False

    def faults(self) -> str:
        """The router's rules (for messages)."""
        return _run(
            "ip", "netns", "exec", self.router_ns, "iptables", "-w", "-t", "raw", "-S", "PREROUTING"
        ).stdout

    # -- the server ----------------------------------------------------------------------

    def kill_postmaster(self) -> int:
        """``kill -9`` of the postmaster (its backends live on until they notice); its pid."""
        pid = self.server.pid
        if pid is None:
            raise NetLabError("the server is not running")
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.server.pid is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        return pid

    def start_server(self, timeout: float = 30.0) -> None:
        """Start the server again (in its namespace); retried while the orphaned
        backends of a killed postmaster still hold its shared memory."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.server.start()
                return
            except ThrowawayError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
