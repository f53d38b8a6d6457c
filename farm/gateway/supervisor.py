"""`farm serve`'s supervisor: it holds the listening socket and runs the gateway in a child
process, which it replaces with a fresh one once the child has grown and gone idle.

A peak of requests leaves the gateway's RSS where the peak took it: CPython's arenas and
glibc's heaps keep the freed memory, fragmented (+26-47 % after 1,000 clients, whatever
was tried inside the process: bench/README.md). A new process on the same socket gives it
all back, as uWSGI's reload-on-rss and gunicorn's max-requests do:

    farm serve (checks, binds the port) --exec--> supervisor (this module; stdlib only)
        child 1: farm serve --socket-fd N --supervisor-fd W   (the gateway, the feeder)
            "ready"                 -> the supervisor says the URL once
            "recycle RSS FLOOR"     -> it has served nothing for a while, and grew
        child 2, same socket: "ready" -> child 1 gets SIGUSR2: it stops accepting, answers
                                         what it has, then exits (farm/gateway/recycle.py)

Both children accept on the socket until the old one stops, so no connection is refused.
A child that dies is replaced (its crash said on stderr, with a growing pause when they
come fast); Ctrl-C or SIGTERM to the supervisor goes to its children, which finish what
they serve, as one `farm serve` did, and the port closes at once for new clients. Children
run in a process group of their own, so a terminal's Ctrl-C reaches them once, through the
supervisor; a child whose supervisor died finds its pipe broken and stops. The feeder runs
in the children: two at once during a replacement are safe (one pass at a time under a
Redis lock, farm/batches/feeder.py).
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

START_WAIT_S = 120.0  # a replacement not ready by then is killed; the running one goes on
STOP_WAIT_S = 60.0  # a stopping or replaced child's requests get this long, then SIGKILL
PAUSES_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between crashes that come soon after a start
STEADY_S = 60.0  # a child that ran this long before it died resets the pauses


@dataclass
class Child:
    proc: subprocess.Popen[bytes]
    pipe: int  # the read end of its messages; -1 once closed
    announce: bool
    ready: bool = False
    buffer: bytes = b""
    started: float = field(default_factory=time.monotonic)
    stop_by: float | None = None  # SIGTERM, then SIGKILL, after this


class Supervisor:
    def __init__(self, sock_fd: int, command: list[str]):
        self.sock_fd = sock_fd  # -1 once closed (stopping)
        self.command = command  # the child's argv, without the fds
        self.selector = selectors.DefaultSelector()
        self.current: Child | None = None
        self.pending: Child | None = None  # a replacement that is starting
        self.leaving: list[Child] = []  # replaced: they drain, then exit
        self.signals: list[int] = []
        self.stopping = False
        self.asked_to_stop = False  # by a signal (not the first gateway failing)
        self.status = 0
        self.crashes = 0
        self.respawn_at: float | None = None
        self.grown: tuple[str, str] = ("?", "?")

    # -- children --------------------------------------------------------------------------
    def spawn(self, announce: bool) -> Child | None:
        read, write = os.pipe()
        argv = [*self.command, "--socket-fd", str(self.sock_fd), "--supervisor-fd", str(write)]
        if not announce:
            argv.append("--quiet")
        try:
            proc = subprocess.Popen(argv, pass_fds=(self.sock_fd, write), process_group=0)
        except OSError as e:
            os.close(read)
            say(f"farm serve: could not start a gateway process: {e}")
            return None
        finally:
            os.close(write)
        os.set_blocking(read, False)
        child = Child(proc, read, announce)
        self.selector.register(read, selectors.EVENT_READ, child)
        return child

    def children(self) -> list[Child]:
        return [c for c in (self.current, self.pending, *self.leaving) if c is not None]

    def run(self) -> int:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda n, _: self.signals.append(n))
        self.current = self.spawn(announce=True)
        if self.current is None:
            return 1
        while True:
            for key, _ in self.selector.select(timeout=0.2):
                self.read(key.data)
            while self.signals:
                self.asked_to_stop = True
                self.stop(self.signals.pop(0))
            status = self.reap()
            if status is not None:
                return status

    def read(self, child: Child) -> None:
        """What the child wrote: whole lines are messages."""
        while child.pipe >= 0:
            try:
                data = os.read(child.pipe, 4096)
            except BlockingIOError:
                return
            if not data:  # it exited (or closed its end): reap() sees the rest
                self.close(child)
                return
            child.buffer += data
            while b"\n" in child.buffer:
                line, child.buffer = child.buffer.split(b"\n", 1)
                self.message(child, line.decode(errors="replace").split())

    def close(self, child: Child) -> None:
        if child.pipe >= 0:
            self.selector.unregister(child.pipe)
            os.close(child.pipe)
            child.pipe = -1

    def message(self, child: Child, words: list[str]) -> None:
        if not words or self.stopping:
            return
        if words[0] == "ready":
            child.ready = True
            if child is self.pending:
                old, self.current, self.pending = self.current, child, None
                if old is not None:
                    old.proc.send_signal(signal.SIGUSR2)  # stop accepting, drain, exit
                    old.stop_by = time.monotonic() + STOP_WAIT_S
                    self.leaving.append(old)
                    say(
                        f"farm serve: gateway process {child.proc.pid} took over from "
                        f"{old.proc.pid}, which had grown from {self.grown[1]} to "
                        f"{self.grown[0]} MiB and served nothing for a while "
                        "(FARM_GATEWAY_RECYCLE_GROWTH)"
                    )
        elif words[0] == "recycle" and child is self.current and self.pending is None:
            self.grown = (words[1], words[2]) if len(words) >= 3 else ("?", "?")
            self.pending = self.spawn(announce=False)

    # -- stopping ----------------------------------------------------------------------------
    def stop(self, signum: int) -> None:
        """Ctrl-C, SIGTERM or SIGHUP: every child gets it, none is started again, and the
        port closes for new clients once the children have closed theirs. A second Ctrl-C
        reaches them too: uvicorn then stops at once. A child still starting gets SIGTERM
        (Ctrl-C would interrupt its imports with a traceback)."""
        self.stopping = True
        if self.sock_fd >= 0:
            os.close(self.sock_fd)
            self.sock_fd = -1
        for child in self.children():
            if child.proc.poll() is None:
                ready = signal.SIGINT if signum == signal.SIGHUP else signum
                child.proc.send_signal(ready if child.ready else signal.SIGTERM)
                if child.stop_by is None:
                    child.stop_by = time.monotonic() + STOP_WAIT_S

    def reap(self) -> int | None:
        """Children that exited or overstayed; the status to exit with once none is left."""
        now = time.monotonic()
        for child in self.children():
            if child.proc.poll() is None and child.stop_by is not None and now > child.stop_by:
                if now > child.stop_by + 10:
                    child.proc.kill()
                else:
                    child.proc.terminate()
        for child in list(self.leaving):
            if child.proc.poll() is not None:
                self.read(child)
                self.close(child)
                self.leaving.remove(child)
        pending = self.pending
        if pending is not None:
            self.read(pending)
            late = not pending.ready and now - pending.started > START_WAIT_S
            if late and pending.proc.poll() is None:
                pending.proc.kill()
                pending.proc.wait()
            if pending.proc.poll() is not None and pending is self.pending:
                self.close(pending)
                self.pending = None
                if not self.stopping:
                    say(
                        "farm serve: a fresh gateway process did not start ("
                        + ("not ready in time" if late else f"status {pending.proc.returncode}")
                        + "); the running one goes on"
                    )
        current = self.current
        if current is not None and current.proc.poll() is not None:
            self.read(current)  # a "ready" it wrote before it died counts
            self.close(current)
            self.current = None
            self.status = exit_status(current.proc.returncode)
            if not self.stopping and not current.ready and current.announce:
                self.stop(signal.SIGTERM)  # the first gateway never started: its error is shown
            elif not self.stopping:
                self.crashes = self.crashes + 1 if now - current.started < STEADY_S else 1
                pause = PAUSES_S[min(self.crashes, len(PAUSES_S)) - 1]
                say(
                    f"farm serve: the gateway process exited with status "
                    f"{current.proc.returncode}; starting another in {pause:g} s"
                )
                self.current, self.pending = self.pending, None
                if self.current is None:
                    self.respawn_at = now + pause
        respawn = self.respawn_at is not None and now >= self.respawn_at
        if self.current is None and respawn and not self.stopping:
            self.respawn_at = None
            self.current = self.spawn(announce=False)
            if self.current is None:
                self.respawn_at = now + PAUSES_S[-1]
        if self.stopping and all(c.proc.poll() is not None for c in self.children()):
            for child in self.children():
                self.close(child)
            return 0 if self.asked_to_stop and self.status in (0, 130, 143) else (self.status or 1)
        return None


def exit_status(returncode: int) -> int:
    """A child's exit as a shell tells it: 128 + N for a death by signal N."""
    return 128 - returncode if returncode < 0 else returncode


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
