"""A learning Ethernet switch with a propagation delay, for simulated hosts (``netlab``).

Where the kernel has ``sch_netem``, ``tc netem`` delays packets in the kernel; this machine
kind's kernel is built without it (only ``tbf``, ``htb`` and FIFO qdiscs), so the lab's
bridge is this process instead: one ``AF_PACKET`` socket per port (the lab's veth ends in the
switch's namespace), MAC learning, and every frame sent on to its port ``delay_us`` (plus up
to ``jitter_us``, uniform) after it arrived, in arrival order per destination. Frames keep
their virtio-net header (``PACKET_VNET_HDR``), so TCP's 64 KiB GSO segments cross as one
unit with their checksum offload intact: a lookup of 185 KB is a handful of frames. Rate
limits stay in the kernel (``tbf`` on each host's egress).

    ip netns exec LAB-br python -m recserve.local.switch --ports p0,p1 --delay-us 50
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import os
import random
import select
import signal
import socket
import sys
import time
from collections.abc import Sequence

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
VNET_HDR = 10  # struct virtio_net_hdr
PACKET_OUTGOING = 4
BROADCAST = b"\xff" * 6
FRAME = 1 << 17  # a 64 KiB GSO frame plus headers fits
SPIN_S = 200e-6


def open_port(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind((name, 0))
    sock.setblocking(False)
    return sock


def run(ports: Sequence[str], delay_us: float, jitter_us: float) -> None:
    socks = [open_port(p) for p in ports]
    by_fd = {s.fileno(): i for i, s in enumerate(socks)}
    where: dict[bytes, int] = {}  # MAC -> port
    due: list[tuple[float, int, int, bytes]] = []  # (time, seq, out port, frame)
    last = [0.0] * len(socks)  # per destination: keep arrival order under jitter
    seq = 0
    delay, jitter = delay_us / 1e6, jitter_us / 1e6
    stop = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print("switch up", flush=True)
    while not stop:
        now = time.monotonic()
        while due and due[0][0] <= now:
            _, _, out, frame = heapq.heappop(due)
            # A full queue or a port going away loses the frame, as a wire would.
            with contextlib.suppress(OSError):
                socks[out].send(frame)
        wait = max(0.0, due[0][0] - time.monotonic()) if due else 0.5
        # select() oversleeps by the timer slack (~50 us and more): hold short waits by polling.
        readable, _, _ = select.select(socks, [], [], 0.0 if wait < SPIN_S else wait - SPIN_S)
        now = time.monotonic()
        for sock in readable:
            port = by_fd[sock.fileno()]
            for _ in range(64):
                try:
                    frame, addr = sock.recvfrom(FRAME)
                except BlockingIOError:
                    break
                if addr[2] == PACKET_OUTGOING or len(frame) < VNET_HDR + 14:
                    continue
                dst = frame[VNET_HDR : VNET_HDR + 6]
                src = frame[VNET_HDR + 6 : VNET_HDR + 12]
                where[src] = port
                outs = (
                    [where[dst]]
                    if dst in where and dst != BROADCAST
                    else [i for i in range(len(socks)) if i != port]
                )
                for out in outs:
                    if out == port:
                        continue
                    at = now + delay + (random.uniform(0, jitter) if jitter else 0.0)
                    at = max(at, last[out])
                    last[out] = at
                    seq += 1
                    heapq.heappush(due, (at, seq, out, frame))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="recserve-switch", description=__doc__.splitlines()[0])
    p.add_argument("--ports", required=True, help="interfaces, comma-separated")
    p.add_argument("--delay-us", type=float, default=50.0)
    p.add_argument("--jitter-us", type=float, default=0.0)
    args = p.parse_args(argv)
    if os.geteuid() == 0:
        os.nice(-5)  # ahead of the servers it carries, so its delays stay close to the set ones
    run(args.ports.split(","), args.delay_us, args.jitter_us)
    return 0


if __name__ == "__main__":
    sys.exit(main())
