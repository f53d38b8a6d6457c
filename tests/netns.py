"""Another host, as far as the network goes: a network namespace joined to this one by a
veth pair, on a private /24 the test picks. A process run under `prefix` reaches this
namespace's servers only through `address` (the root end of the veth), and `cut()` takes
that link down: packets are dropped, no connection is reset, neither side hears of the
other, as when a host drops off the network. `restore()` brings it back.

Needs root and `ip` (CI runs as root); `make()` says why it cannot when it cannot.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess


class Host:
    def __init__(self, name: str, root_end: str, subnet: int):
        self.name = name
        self.root_end = root_end
        self.address = f"10.213.{subnet}.1"  # this namespace's side, which the host reaches
        self.prefix = ["ip", "netns", "exec", name]

    def cut(self) -> None:
        _ip("link", "set", self.root_end, "down")

    def restore(self) -> None:
        _ip("link", "set", self.root_end, "up")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.root_end], capture_output=True)


def make() -> Host | str:
    """A new namespace joined to this one, or the reason none can be made here."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2) on this machine"
    tag = secrets.token_hex(3)
    # Not a /24 another host (of this test or another one running) has: two veths on one
    # subnet would leave this namespace's route to the servers on the other's link.
    used = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True).stdout
    free = [n for n in range(1, 251) if f" 10.213.{n}." not in used]
    subnet = free[secrets.randbelow(len(free))]
    host = Host(f"farm-{tag}", f"vf{tag}a", subnet)
    inner = f"vf{tag}b"
    try:
        _ip("netns", "add", host.name)
        _ip("link", "add", host.root_end, "type", "veth", "peer", "name", inner)
        _ip("link", "set", inner, "netns", host.name)
        _ip("addr", "add", f"{host.address}/24", "dev", host.root_end)
        _ip("link", "set", host.root_end, "up")
        _ip("-n", host.name, "addr", "add", f"10.213.{subnet}.2/24", "dev", inner)
        _ip("-n", host.name, "link", "set", inner, "up")
        _ip("-n", host.name, "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        host.close()
        return f"cannot make a network namespace here: {e.stderr.decode().strip()} (needs root)"
    return host


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
