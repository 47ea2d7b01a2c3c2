"""The control API's client: what `gpumarket` commands use to talk to a running node.

Standard library only, on purpose: a command such as `gpumarket status` must not pay for
importing trio, web3 or libp2p (seconds) to send one line over a Unix socket. The protocol
and the server are in node/control.py.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

SOCKET_NAME = "control.sock"
TOKEN_NAME = "control.token"


class ControlError(Exception):
    """A control request failed; str() is one line for the person at the terminal. `kind` says
    which (the CLI's exit code follows it): "refused" (the node or a peer would not do it),
    "not_found" (no such offer or rental, no node), "chain" (the chain refused or is
    unreachable), "internal" (a bug)."""

    def __init__(self, message: str, kind: str = "refused") -> None:
        super().__init__(message)
        self.kind = kind


class NoNodeRunning(ControlError):
    """No node answers on this data directory's control socket."""

    def __init__(self, message: str) -> None:
        super().__init__(message, "not_found")


def call(data_dir: Path, op: str, timeout_s: float = 120.0, **args: Any) -> Any:
    data_dir = Path(data_dir).expanduser()
    sock_path, token_path = data_dir / SOCKET_NAME, data_dir / TOKEN_NAME
    hint = f"no node is running for {data_dir}: start one with `gpumarket node run`"
    try:
        token = token_path.read_text().strip()
    except FileNotFoundError:
        raise NoNodeRunning(hint) from None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout_s)
    try:
        s.connect(str(sock_path))
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoNodeRunning(hint) from None
    try:
        s.sendall(json.dumps({"token": token, "op": op, "args": args}).encode() + b"\n")
        buf = bytearray()
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    except socket.timeout:
        raise ControlError(f"the node did not answer {op!r} within {timeout_s:.0f} s") from None
    finally:
        s.close()
    if not buf:
        raise ControlError("the node closed the connection without answering")
    reply = json.loads(buf.split(b"\n", 1)[0])
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "unknown error"), reply.get("kind", "refused"))
    return reply.get("result")



