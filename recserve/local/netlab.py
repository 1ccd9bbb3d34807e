"""Simulated hosts on one machine: network namespaces joined through a delaying switch,
with a commodity data-center link on every host.

Host ``i`` is namespace ``<tag>-h<i>`` with one interface, ``e0``, at ``10.77.0.<i + 1>/24``.
Its peer, port ``p<i>``, sits in the lab's switch namespace (``<tag>-br``), where
``recserve.local.switch`` forwards frames between ports ``delay_us`` (plus up to
``jitter_us``) after they arrive: the one-way delay between two hosts. A ``tbf`` qdisc on
both ends of every link caps its rate. Defaults: 50 us one way with 10 us of jitter (a
~100 us round trip, within a rack: Guo et al., SIGCOMM 2015 "Pingmesh" report intra-rack
RTTs of a few hundred us at P50 including the hosts' stacks) and 10 Gbit/s, the commodity
NIC of Lui et al.'s setting. The delay is the switch's, not ``tc netem``'s: this machine
kind's kernel has no ``sch_netem`` (only ``tbf``, ``htb`` and FIFO qdiscs).

Nothing is created in the caller's namespace: interfaces are made inside the lab's
namespaces, and the host's own interfaces and routes are never touched. Deleting the
namespaces (``close``, also from ``atexit`` and on SIGTERM/SIGINT in the study command)
removes every link and qdisc with them; ``sweep`` removes labs left by a process that died.
Needs root and iproute2.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass

PREFIX = "rslab"
SUBNET = "10.77.0"


def available() -> str | None:
    """None when labs can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    return None


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


def namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep() -> list[str]:
    """Delete labs whose creating process is gone; returns their namespaces."""
    gone = []
    for ns in namespaces():
        if not ns.startswith(PREFIX):
            continue
        pid = ns[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            gone.append(ns)
    return gone


@dataclass(frozen=True)
class Link:
    delay_us: float = 50.0  # one way between two hosts (the switch's hold time)
    jitter_us: float = 10.0
    rate_gbit: float = 10.0


class NetLab:
    """``hosts`` simulated hosts; ``close`` (or leaving the ``with``) removes them."""

    def __init__(self, hosts: int, link: Link = Link()) -> None:
        if not 1 <= hosts <= 200:
            raise ValueError("a lab has 1..200 hosts")
        why = available()
        if why is not None:
            raise RuntimeError(f"cannot make simulated hosts: {why}")
        self.hosts = hosts
        self.link = link
        self.tag = f"{PREFIX}{os.getpid()}-{os.urandom(2).hex()}"
        self.bridge = f"{self.tag}-br"
        self.made: list[str] = []
        self.switch: subprocess.Popen[bytes] | None = None
        try:
            self._make()
        except BaseException:
            self.close()
            raise

    def ns(self, host: int) -> str:
        return f"{self.tag}-h{host}"

    def addr(self, host: int) -> str:
        return f"{SUBNET}.{host + 1}"

    def cmd(self, host: int, argv: Sequence[str]) -> list[str]:
        """``argv`` run on ``host`` (``ip netns exec`` execs it: the pid is the program's)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def _make(self) -> None:
        _run("ip", "netns", "add", self.bridge)
        self.made.append(self.bridge)
        ports = []
        for i in range(self.hosts):
            ns = self.ns(i)
            _run("ip", "netns", "add", ns)
            self.made.append(ns)
            port = f"p{i}"
            _run("ip", "-n", self.bridge, "link", "add", port, "type", "veth", "peer", "name",
                 "e0", "netns", ns)  # fmt: skip
            _run("ip", "-n", self.bridge, "link", "set", port, "up")
            _run("ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", "e0")
            _run("ip", "-n", ns, "link", "set", "e0", "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            self._shape(ns, "e0")
            self._shape(self.bridge, port)
            ports.append(port)
        argv = [sys.executable, "-m", "recserve.local.switch", "--ports", ",".join(ports)]
        argv += ["--delay-us", str(self.link.delay_us), "--jitter-us", str(self.link.jitter_us)]
        self.switch = subprocess.Popen(
            ["ip", "netns", "exec", self.bridge, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.switch.stdout is not None
        line = self.switch.stdout.readline()
        if b"switch up" not in line:
            raise RuntimeError(f"the lab's switch did not start: {line!r}")

    def _shape(self, ns: str, dev: str) -> None:
        rate = [f"{self.link.rate_gbit:g}gbit", "burst", "1mb", "latency", "50ms"]
        _run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
             "rate", *rate)  # fmt: skip

    def qdiscs(self) -> list[str]:
        """The lab's qdiscs (``tc qdisc show`` in every namespace), for checks."""
        out = []
        for ns in self.made:
            shown = subprocess.run(
                ["ip", "netns", "exec", ns, "tc", "qdisc", "show"], capture_output=True, text=True
            ).stdout
            out += [
                f"{ns}: {line}" for line in shown.splitlines() if "netem" in line or "tbf" in line
            ]
        return out

    def close(self) -> None:
        if self.switch is not None:
            if self.switch.poll() is None:
                self.switch.terminate()
                try:
                    self.switch.wait(10)
                except subprocess.TimeoutExpired:
                    self.switch.kill()
                    self.switch.wait()
            if self.switch.stdout is not None:
                self.switch.stdout.close()
            self.switch = None
        for ns in reversed(self.made):
            with contextlib.suppress(Exception):
                subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.made.clear()

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
