"""`farm serve`'s supervisor: it holds the listening socket and runs the gateway in a child
process, which it replaces with a fresh one once the child has grown and gone idle.

A peak of requests leaves the gateway's RSS where the peak took it: CPython's arenas and
glibc's heaps keep the freed memory, fragmented (+44-49 % after 1,000 clients, whatever
was tried inside the process: bench/README.md). A new process on the same socket gives it
all back, as uWSGI's reload-on-rss and gunicorn's max-requests do:

    farm serve (checks, binds the port) --exec--> supervisor (this module; stdlib only)
        child 1: farm serve --socket-fd N --supervisor-fd W   (the gateway, the feeder)
            "ready"                 -> the supervisor says the URL once
            "recycle RSS FLOOR"     -> it has served nothing for a while and grew
        child 2, same socket: "ready" -> child 1 gets SIGTERM (it has nothing in flight)

Both children accept on the socket while the new one starts, so no connection is refused.
A child that dies is replaced (its crash said on stderr); Ctrl-C or SIGTERM to the
supervisor goes to its children, which finish what they serve, as one `farm serve` did.
Children run in a process group of their own, so a terminal's Ctrl-C reaches them once,
through the supervisor; a child whose supervisor died (SIGKILL) stops by itself
(farm/gateway/recycle.py). The feeder runs in the children: two at once during a
replacement are safe (one pass at a time under a Redis lock, farm/batches/feeder.py).
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

RESPAWN_PAUSE_S = 1.0  # between a crashed child and the next, when crashes come fast
STOP_WAIT_S = 60.0  # a stopping child's in-flight requests get this long, then SIGKILL


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    pipe: int  # the read end of its messages
    announce: bool
    ready: bool = False
    buffer: bytes = b""
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(self, sock_fd: int, command: list[str]):
        self.sock_fd = sock_fd
        self.command = command  # the child's argv, without the fds
        self.selector = selectors.DefaultSelector()
        self.current: Child | None = None
        self.pending: Child | None = None  # a replacement that is starting
        self.leaving: list[Child] = []  # replaced, or stopping: reaped as they exit
        self.signals: list[int] = []
        self.stopping = False
        self.asked_to_stop = False  # by a signal (not the first gateway failing)
        self.stop_by: float | None = None
        self.status = 0
        self.replaced = 0
        self.grown: tuple[str, str] = ("?", "?")

    def spawn(self, announce: bool) -> Child:
        read, write = os.pipe()
        argv = [*self.command, "--socket-fd", str(self.sock_fd), "--supervisor-fd", str(write)]
        if not announce:
            argv.append("--quiet")
        proc = subprocess.Popen(argv, pass_fds=(self.sock_fd, write), process_group=0)
        os.close(write)
        os.set_blocking(read, False)
        child = Child(proc, read, announce)
        self.selector.register(read, selectors.EVENT_READ, child)
        return child

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda n, _: self.signals.append(n))
        self.current = self.spawn(announce=True)
        while True:
            for key, _ in self.selector.select(timeout=0.2):
                self.read(key.data)
            while self.signals:
                self.asked_to_stop = True
                self.forward(self.signals.pop(0))
            status = self.reap()
            if status is not None:
                return status

    def read(self, child: Child) -> None:
        try:
            data = os.read(child.pipe, 4096)
        except BlockingIOError:
            return
        if not data:  # it closed its end (it exited): reap() sees the rest
            self.selector.unregister(child.pipe)
            os.close(child.pipe)
            child.pipe = -1
            return
        child.buffer += data
        while b"\n" in child.buffer:
            line, child.buffer = child.buffer.split(b"\n", 1)
            self.message(child, line.decode(errors="replace").split())

    def message(self, child: Child, words: list[str]) -> None:
        if not words:
            return
        if words[0] == "ready":
            child.ready = True
            if child is self.pending and self.current is not None:
                old, self.current, self.pending = self.current, child, None
                old.proc.send_signal(signal.SIGTERM)
                self.leaving.append(old)
                self.replaced += 1
                say(
                    f"farm serve: gateway process {child.proc.pid} took over from "
                    f"{old.proc.pid}, which had grown from {self.grown[1]} to "
                    f"{self.grown[0]} MiB and served nothing for a while "
                    "(FARM_GATEWAY_RECYCLE_GROWTH)"
                )
        elif (
            words[0] == "recycle"
            and child is self.current
            and self.pending is None
            and not self.stopping
        ):
            self.grown = (words[1], words[2]) if len(words) >= 3 else ("?", "?")
            self.pending = self.spawn(announce=False)

    def forward(self, signum: int) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: every child gets it, and none is started again. A
        second Ctrl-C reaches them too: uvicorn then stops at once."""
        self.stopping = True
        for child in self.children():
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGINT if signum == signal.SIGHUP else signum)
        if self.stop_by is None:
            self.stop_by = time.monotonic() + STOP_WAIT_S

    def children(self) -> list[Child]:
        return [c for c in (self.current, self.pending, *self.leaving) if c is not None]

    def reap(self) -> int | None:
        """Children that exited; the status to exit with once there is nothing left."""
        for child in list(self.leaving):
            if child.proc.poll() is not None:
                self.leaving.remove(child)
                self.drop(child)
        pending = self.pending
        if pending is not None and pending.proc.poll() is not None:
            self.drop(pending)
            self.pending = None
            if not self.stopping:
                say(
                    f"farm serve: a fresh gateway process did not start (status "
                    f"{pending.proc.returncode}); the running one goes on"
                )
        current = self.current
        if current is not None and current.proc.poll() is not None:
            self.drop(current)
            self.current = None
            self.status = current.proc.returncode
            if self.stopping:
                pass
            elif not current.ready and current.announce:
                # The first gateway never started: its error is on stderr; so is the exit.
                self.forward(signal.SIGTERM)
            else:
                say(
                    f"farm serve: the gateway process exited with status {self.status}; "
                    "starting another"
                )
                if time.monotonic() - current.started < RESPAWN_PAUSE_S:
                    time.sleep(RESPAWN_PAUSE_S)
                self.current, self.pending = self.pending or self.spawn(announce=False), None
        if self.stopping:
            alive = [c for c in self.children() if c.proc.poll() is None]
            if not alive:
                for child in self.children():
                    self.drop(child)
                clean = self.status in (0, -signal.SIGINT, -signal.SIGTERM)
                return 0 if clean and self.asked_to_stop else (self.status or 1)
            if self.stop_by is not None and time.monotonic() > self.stop_by:
                for child in alive:
                    child.proc.kill()
        return None

    def drop(self, child: Child) -> None:
        if child.pipe >= 0:
            self.selector.unregister(child.pipe)
            os.close(child.pipe)
            child.pipe = -1


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farm serve (supervisor)")
    parser.add_argument("--fd", type=int, required=True, help="the listening socket")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the child's argv")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    return Supervisor(args.fd, command).run()


if __name__ == "__main__":
    sys.exit(main())
