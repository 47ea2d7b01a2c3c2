"""The local control API: how `gpumarket` commands talk to a running `gpumarket node run`.

A Unix socket `control.sock` in the node's data directory, created with mode 0600, and a random
token in `control.token` (0600): only the user who runs the node can read the token or connect.
One connection carries one request line and one reply line, both JSON:

    {"token": "...", "op": "search", "args": {"query": "gpu=RTX_4090", "sort": "price"}}
    {"ok": true, "result": [...]}        or        {"ok": false, "error": "one line"}

Requests are bounded (64 KiB, 10 s to arrive); a wrong token is refused without detail.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import trio

from protocol.errors import ProtocolError
from protocol.encoding import decode
from protocol.evidence import build_bundle
from protocol.messages import UsageReceipt
from protocol.money import PriceError, format_tokens, max_units_per_second
from protocol.identity import short_id
from protocol.query import rank_tier

from .chain import ChainError
from .node import Node, RentError, now_ms

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
TOKEN_NAME = "control.token"
MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT_S = 10.0


class ControlError(Exception):
    """A control request failed; str() is one line for the person at the terminal."""


class NoNodeRunning(ControlError):
    """No node answers on this data directory's control socket."""


# ---------------------------------------------------------------------------------------------
# Server


def _write_token(path: Path) -> str:
    token = secrets.token_hex(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.replace(tmp, path)
    return token


class ControlServer:
    def __init__(self, node: Node, data_dir: Path) -> None:
        self.node = node
        self.sock_path = Path(data_dir) / SOCKET_NAME
        self.token_path = Path(data_dir) / TOKEN_NAME
        self.token = ""

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.token = _write_token(self.token_path)
        if self.sock_path.exists():
            self.sock_path.unlink()  # a stale socket from a killed node
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket file is created 0600
        try:
            await sock.bind(str(self.sock_path))
        finally:
            os.umask(old)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            task_status.started()
            await trio.serve_listeners(self._handle, [listener])
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                await listener.aclose()
            for p in (self.sock_path, self.token_path):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT_S):
                    raw = await _read_line(stream)
                request = json.loads(raw)
                if not isinstance(request, dict):
                    raise ValueError("request must be a JSON object")
            except (trio.TooSlowError, ValueError, UnicodeDecodeError) as exc:
                await _send(stream, {"ok": False, "error": f"bad request: {exc}"})
                return
            if not hmac.compare_digest(str(request.get("token", "")), self.token):
                await _send(stream, {"ok": False, "error": "refused: wrong control token"})
                return
            op = request.get("op")
            if op == "exec":  # a stream of frames follows the reply line (node/access.py)
                await self._exec(stream, request.get("args") or {})
                return
            if op == "forward":  # raw bytes follow the reply line (node/access.py)
                await self._forward(stream, request.get("args") or {})
                return
            if op == "cp":  # a tar stream follows the reply line (node/access.py)
                await self._copy(stream, request.get("args") or {})
                return
            handler = getattr(self, f"op_{op}", None) if isinstance(op, str) else None
            if handler is None:
                await _send(stream, {"ok": False, "error": f"unknown operation {op!r}"})
                return
            try:
                result = await handler(**(request.get("args") or {}))
                reply = {"ok": True, "result": result}
            except (RentError, ChainError, ControlError, ProtocolError, KeyError, ValueError) as exc:
                reply = {"ok": False, "error": str(exc)}
            except Exception as exc:
                log.exception("control op %s failed", op)
                reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
            await _send(stream, reply)

    async def _exec(self, stream: trio.SocketStream, args: dict) -> None:
        from .access import relay_exec

        try:
            rental = self._rental(str(args.get("agreement_id", "")))
            argv = [str(a) for a in args.get("argv") or []]
            tty, rows, cols = bool(args.get("tty")), int(args.get("rows", 0)), int(args.get("cols", 0))
        except (ControlError, KeyError, ValueError, TypeError) as exc:
            await _send(stream, {"ok": False, "error": str(exc)})
            return
        if rental.role != "renter":
            await _send(stream, {"ok": False, "error": "run and shell are for the renter's node"})
            return
        await _send(stream, {"ok": True, "result": "frames follow"})
        await relay_exec(self.node, stream, rental.agreement_id, argv, tty, rows, cols)

    async def _copy(self, stream: trio.SocketStream, args: dict) -> None:
        from .access import COPY_IN, COPY_OUT, relay_copy

        try:
            rental = self._rental(str(args.get("agreement_id", "")))
            direction, path = args.get("direction"), str(args.get("path", ""))
            if direction not in (COPY_IN, COPY_OUT):
                raise ValueError("direction must be 0 (in) or 1 (out)")
        except (ControlError, ValueError, TypeError) as exc:
            await _send(stream, {"ok": False, "error": str(exc)})
            return
        await relay_copy(self.node, stream, rental.agreement_id, direction, path,
                         lambda reply: _send(stream, reply))

    async def _forward(self, stream: trio.SocketStream, args: dict) -> None:
        from .access import relay_forward

        try:
            rental = self._rental(str(args.get("agreement_id", "")))
            port = int(args.get("port", 0))
            if not 1 <= port <= 65535:
                raise ValueError(f"port {port} is not 1..65535")
        except (ControlError, ValueError, TypeError) as exc:
            await _send(stream, {"ok": False, "error": str(exc)})
            return
        await relay_forward(self.node, stream, rental.agreement_id, port,
                            lambda reply: _send(stream, reply))

    # -- operations --------------------------------------------------------------------------

    async def op_status(self) -> dict:
        n = self.node
        return {
            "name": n.config.name, "peer_id": str(n.peer_id), "addrs": n.addrs(),
            "wallet": "0x" + n.binding.wallet.hex(), "chain_id": n.chain.chain.chain_id,
            "escrow": "0x" + n.chain.chain.escrow_address.hex(),
            "provider": n.publisher is not None, "offers_in_book": len(n.book),
            "rentals": len(n.rentals),
            "counters": dict(n.offers.counters) if n.offers is not None else {},
            # Interruptible capacity: why it is withdrawn now (None: offered), the last price
            "curtailment": n.curtailment,
            "power_price": None if n.power_watch is None or n.power_watch.last is None else {
                "per_mwh": str(n.power_watch.last.per_mwh), "at_s": n.power_watch.last.ts_s,
                "feed_errors": n.power_watch.errors},
        }

    async def op_search(self, query: str = "", sort: str | None = "rank", limit: int = 50) -> list:
        # rank (the default): known-good providers, then established, then new unknown ones,
        # then known-bad, each by price (specs/offerbook.md, "Ranking"): a flood of fresh cheap
        # identities does not bury the providers this node knows.
        now = now_ms()
        entries = self.node.search(query, sort or "rank", limit=limit, at_ms=now)
        cutoff = now - self.node.book.params.book_established_ms
        return [offer_row(e, now, cutoff) for e in entries]

    async def op_quote(self, offer_id: str, seconds: int, gpu_count: int = 1, notice_s: int = 0) -> dict:
        entry = self.node.book.get(offer_id)
        o = entry.offer
        if now_ms() > o.expires_ms:
            raise ControlError(f"offer {offer_id} expired; search again")
        why = self.node.not_rentable(entry)
        if why is not None:
            raise ControlError(f"offer {offer_id} cannot be rented from this node: {why}")
        if notice_s and o.interruptible_set(notice_s) is None:
            raise ControlError(f"offer {offer_id} has no interruptible GPUs with a {notice_s} s notice")
        deposit = o.class_price(notice_s) * gpu_count * seconds
        now = now_ms()
        return {"offer": offer_row(entry, now, now - self.node.book.params.book_established_ms),
                "deposit": deposit,
                "deposit_tokens": format_tokens(deposit, o.terms.token_decimals),
                "token": o.terms.token_symbol}

    async def op_rent(self, offer_id: str, seconds: int, gpu_count: int = 1,
                      max_price_per_gpu_hour: str | None = None, access_key: str = "",
                      notice_s: int = 0, image: str = "") -> dict:
        entry = self.node.book.get(offer_id)
        o = entry.offer
        if now_ms() > o.expires_ms:
            raise ControlError(f"offer {offer_id} expired between search and rent; search again")
        if notice_s and o.interruptible_set(notice_s) is None:
            raise ControlError(f"offer {offer_id} has no interruptible GPUs with a {notice_s} s notice")
        if max_price_per_gpu_hour is None:
            max_price = o.class_price(notice_s)
        else:
            try:  # rounded down: never more per second than the renter wrote
                max_price = max_units_per_second(Decimal(max_price_per_gpu_hour), o.terms.token_decimals)
            except (InvalidOperation, PriceError) as exc:
                raise ControlError(f"--max-price {max_price_per_gpu_hour}: {exc}") from None
        rental = await self.node.rent([entry], gpu_count=gpu_count, duration_s=seconds,
                                      max_price_per_gpu_second=max_price, access_key=access_key,
                                      notice_s=notice_s, image=image)
        return rental_row(self.node, rental)

    async def op_rentals(self) -> list:
        return [rental_row(self.node, r) for r in self.node.rentals.values()]

    async def op_stop(self, agreement_id: str) -> dict:
        rental = self._rental(agreement_id)
        await self.node.stop_rental(rental.agreement_id)
        return rental_row(self.node, rental)

    async def op_evidence(self, agreement_id: str) -> dict:
        rental = self._rental(agreement_id)
        store = self.node.store
        heartbeats = [row.raw for row in await store.heartbeats(rental.agreement_id)]
        receipts = [row.raw for row in await store.receipts(rental.agreement_id)]
        notices = [raw for kind, raw, _ in await store.evidence(rental.agreement_id)
                   if kind == "preemption_notice"]
        bundle = build_bundle(rental.terms, rental.details, rental.provider_binding,
                              rental.renter_binding, rental.started_s or 0, heartbeats, receipts,
                              notices)
        return {"agreement_id": rental.agreement_id.hex(), "bundle": bundle.encode().hex(),
                "heartbeats": len(heartbeats), "receipts": len(receipts)}

    async def op_escrow_status(self, agreement_id: str) -> dict:
        rental = self._rental(agreement_id)
        status = await self.node.chain.status(rental.agreement_id)
        return {"agreement_id": rental.agreement_id.hex(), "state": status.state,
                "end_s": status.end_s, "acked_seconds": status.acked_seconds,
                "deposit": rental.terms.deposit}

    async def op_escrow_claim(self, agreement_id: str) -> dict:
        """Provider: claim now with the latest receipt in the store (the renter is gone)."""
        rental = self._rental(agreement_id)
        if rental.role != "provider":
            raise ControlError("only the provider claims; a renter uses `gpumarket escrow recover`")
        row = await self.node.store.latest_receipt(rental.agreement_id)
        if row is None:
            raise ControlError("no receipt stored for this agreement: there is nothing to claim")
        receipt = decode(row.raw, UsageReceipt)
        result = await self.node.chain.claim(self.node.wallet_key, rental.terms,
                                             receipt.acked_seconds, receipt.wallet_sig)
        return {"tx": result.tx_hash, "acked_seconds": receipt.acked_seconds,
                "paid": rental.terms.price_per_second * receipt.acked_seconds}

    async def op_escrow_recover(self, agreement_id: str) -> dict:
        """Anyone, for the renter: return the whole deposit once end + grace passed unclaimed."""
        rental = self._rental(agreement_id)
        result = await self.node.chain.recover(self.node.wallet_key, rental.terms)
        return {"tx": result.tx_hash, "refunded": rental.terms.deposit}

    async def op_publish(self) -> dict:
        if self.node.publisher is None:
            raise ControlError("this node is not a provider (set [provider] enabled = true)")
        offer = await self.node.publisher.publish()
        return {"seq": offer.seq, "gpus": len(offer.gpus)}

    async def op_withdraw(self) -> dict:
        if self.node.publisher is None:
            raise ControlError("this node is not a provider")
        msg = await self.node.publisher.withdraw()
        return {"withdrawn": msg is not None}

    def _rental(self, prefix: str):
        prefix = prefix.lower().removeprefix("0x")
        matches = [r for aid, r in self.node.rentals.items() if aid.hex().startswith(prefix)]
        if not prefix or not matches:
            raise ControlError(f"no rental {prefix!r} on this node (see `gpumarket rentals`)")
        if len(matches) > 1:
            raise ControlError(f"{prefix!r} matches {len(matches)} rentals; give more digits")
        return matches[0]


TIER_NAMES = ("known-good", "proven", "established", "new", "known-bad")  # query.rank_tier's order


def offer_row(entry, now: int, established_before_ms: int) -> dict:
    """A search result; `tier` is its rank tier (query.rank_tier), `held_s` how long this
    node's book has held offers of the provider."""
    o = entry.offer
    g = o.gpus[0]
    return {
        "offer_id": entry.offer_id, "provider": short_id(o.provider), "model": g.model,
        "gpus": len(o.gpus), "vram_gib": round(g.vram_mib / 1024), "region": o.host.region,
        "cuda": f"{g.cuda_version // 1000}.{g.cuda_version % 1000 // 10}",
        "price_per_gpu_hour": format_tokens(entry.price_per_gpu_hour, entry.token_decimals),
        "token": o.terms.token_symbol, "score": round(entry.score, 3),
        "tier": TIER_NAMES[rank_tier(entry.score, entry.since_ms, established_before_ms,
                                     entry.proven)],
        "held_s": max(0, (now - entry.since_ms) // 1000),
        "expires_in_s": max(0, (o.expires_ms - now) // 1000),
        # Interruptible sets: rent one with `gpumarket rent --interruptible NOTICE_S`
        "interruptible": [{"gpus": len(s.gpus), "notice_s": s.notice_s,
                           "price_per_gpu_hour": format_tokens(s.price_per_gpu_second * 3600,
                                                               entry.token_decimals)}
                          for s in o.interruptible],
    }


def rental_row(node: Node, rental) -> dict:
    session = rental.session
    machine = session.machine if session is not None else None
    acked = getattr(machine, "acked_seconds", 0) if machine is not None else 0
    state = machine.state if machine is not None else "pending"
    elapsed = max(0, now_ms() // 1000 - (rental.started_s or now_ms() // 1000))
    return {
        "agreement_id": rental.agreement_id.hex(), "role": rental.role, "state": state,
        "provider": short_id(rental.details.provider_key), "gpus": len(rental.details.gpus),
        "max_seconds": rental.terms.max_seconds, "elapsed_s": min(elapsed, rental.terms.max_seconds),
        "acked_seconds": acked, "deposit": rental.terms.deposit,
        "cost_so_far": rental.terms.price_per_second * acked,
        "heartbeats": session.log.heartbeats if session else 0,
        "receipts": session.log.receipts if session else 0,
        "access": rental.access if rental.role == "provider" else getattr(session, "access", None),
        "class": "interruptible" if rental.details.notice_s else "on-demand",
        "image": rental.details.image,
        "notice": _notice_row(machine),
    }


def _notice_row(machine) -> dict | None:
    """A preemption notice sent (provider) or held (renter), with the time left to its stop."""
    notice = getattr(machine, "notice", None)
    if notice is None:
        return None
    return {"stop_ms": notice.stop_ms, "reason": notice.reason, "detail": notice.detail,
            "time_left_s": max(0, (notice.stop_ms - now_ms()) // 1000)}


async def _read_line(stream: trio.SocketStream) -> str:
    buf = bytearray()
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > MAX_REQUEST:
            raise ValueError("request too large")
    return buf.split(b"\n", 1)[0].decode()


async def _send(stream: trio.SocketStream, doc: dict) -> None:
    try:
        await stream.send_all(json.dumps(doc, default=str).encode() + b"\n")
    except trio.BrokenResourceError:
        pass


# ---------------------------------------------------------------------------------------------
# Client (synchronous: the CLI is a short-lived process)


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
        raise ControlError(reply.get("error", "unknown error"))
    return reply.get("result")



