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
from .control_client import SOCKET_NAME, TOKEN_NAME, ControlError, NoNodeRunning, call  # noqa: F401
from .node import Node, RentError, now_ms

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT_S = 10.0
SHOWN_IDS = 4096  # offer ids a search showed, remembered to name their replacements


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
        self._token_info: tuple[str, int] | None = None
        self._shown: dict[str, bytes] = {}  # offer ids shown by search -> provider, newest last

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
                reply = {"ok": False, "error": str(exc), "kind": error_kind(exc)}
            except Exception as exc:
                log.exception("control op %s failed", op)
                reply = {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}",
                         "kind": "internal"}
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
            "dialable": list(n.announce_addrs()),
            "bootstrap": list(n.config.bootstrap),
            "peers": len(n.host.host.get_network().connections),
            "wallet": "0x" + n.binding.wallet.hex(), "chain_id": n.chain.chain.chain_id,
            "escrow": "0x" + n.chain.chain.escrow_address.hex(),
            "escrow_is_computed": n.chain.chain.escrow_address == _computed_escrow(),
            "provider": n.publisher is not None, "offers_in_book": len(n.book),
            "rentals": len(n.rentals),
            "counters": dict(n.offers.counters) if n.offers is not None else {},
            # Interruptible capacity: why it is withdrawn now (None: offered), the last price
            "curtailment": n.curtailment,
            "power_price": None if n.power_watch is None or n.power_watch.last is None else {
                "per_mwh": str(n.power_watch.last.per_mwh), "at_s": n.power_watch.last.ts_s,
                "feed_errors": n.power_watch.errors},
            # public / private / unknown, relay service, reservations (node/reachability.py)
            "reachability": n.host.reachability.summary() if n.host.reachability else None,
        }

    async def op_search(self, query: str = "", sort: str | None = "rank", limit: int = 50) -> list:
        # rank (the default): known-good providers, then established, then new unknown ones,
        # then known-bad, each by price (specs/offerbook.md, "Ranking"): a flood of fresh cheap
        # identities does not bury the providers this node knows.
        now = now_ms()
        entries = self.node.search(query, sort or "rank", limit=limit, at_ms=now)
        self._remember_shown(entries)
        cutoff = now - self.node.book.params.book_established_ms
        return [offer_row(e, now, cutoff) for e in entries]

    def _entry(self, offer_id: str):
        """The book's entry for an id the renter gives. An id this server showed in a search
        whose offer its provider has since re-announced (a new seq, so a new digest) or
        withdrawn is answered with what replaced it, never a bare unknown_offer."""
        try:
            return self.node.book.get(offer_id)
        except ProtocolError as exc:
            if getattr(exc, "code", None) != "unknown_offer":
                raise
            prefix = offer_id.strip().lower()
            provider = next((p for oid, p in reversed(self._shown.items())
                             if oid.startswith(prefix) or prefix.startswith(oid)), None)
            if provider is None:
                raise
            now = now_ms()
            held = self.node.book.held(provider)
            if held is None:
                raise ControlError(f"offer {offer_id} was withdrawn by its provider "
                                   f"{short_id(provider)}; search again", "not_found") from None
            row = offer_row(held, now, now - self.node.book.params.book_established_ms)
            raise ControlError(
                f"offer {offer_id} was replaced by offer {held.offer_id} from the same provider "
                f"({row['gpus']}x {row['model']} at {row['price_per_gpu_hour']} {row['token']}"
                f"/GPU-hour): rent {held.offer_id}", "not_found") from None

    def _remember_shown(self, entries) -> None:
        for e in entries:
            self._shown.pop(e.offer_id, None)
            self._shown[e.offer_id] = e.provider
        while len(self._shown) > SHOWN_IDS:
            self._shown.pop(next(iter(self._shown)))

    async def op_quote(self, offer_id: str, seconds: int, gpu_count: int = 1, notice_s: int = 0) -> dict:
        entry = self._entry(offer_id)
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
                "deposit": deposit, "decimals": o.terms.token_decimals,
                "deposit_tokens": format_tokens(deposit, o.terms.token_decimals),
                "token": o.terms.token_symbol}

    async def op_rent(self, offer_id: str, seconds: int, gpu_count: int = 1,
                      max_price_per_gpu_hour: str | None = None, access_key: str = "",
                      notice_s: int = 0, image: str = "") -> dict:
        entry = self._entry(offer_id)
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
        return rental_row(self.node, rental, await self._token())

    async def op_rentals(self, all: bool = False) -> list:
        """This run's rentals; with `all`, every agreement in the store too (past runs, ended,
        never opened), newest first, from the store's records and receipts."""
        token = await self._token()
        rows = [rental_row(self.node, r, token) for r in self.node.rentals.values()]
        if not all:
            return rows
        live = {r["agreement_id"] for r in rows}
        from .records import decode_agreement

        symbol, decimals = token
        for rec in await self.node.store.all_agreements():
            if rec.id.hex() in live:
                continue
            terms, details = decode_agreement(rec.terms)
            receipt = await self.node.store.latest_receipt(rec.id)
            acked = receipt.acked_seconds if receipt is not None else 0
            heartbeats = len(await self.node.store.heartbeats(rec.id))
            rows.append({
                "agreement_id": rec.id.hex(), "role": rec.role, "state": rec.state,
                "provider": short_id(details.provider_key), "gpus": len(details.gpus),
                "max_seconds": terms.max_seconds, "elapsed_s": acked, "acked_seconds": acked,
                "token": symbol, "deposit": terms.deposit,
                "deposit_tokens": format_tokens(terms.deposit, decimals),
                "cost_so_far": terms.price_per_second * acked,
                "cost_so_far_tokens": format_tokens(terms.price_per_second * acked, decimals),
                "price_per_gpu_hour": format_tokens(
                    terms.price_per_second * 3600 // max(1, len(details.gpus)), decimals),
                "heartbeats": heartbeats, "receipts": 1 if receipt else 0, "access": None,
                "created_at": rec.created_at, "updated_at": rec.updated_at, "live": False,
            })
        return rows

    async def op_stop(self, agreement_id: str) -> dict:
        rental = self._rental(agreement_id)
        await self.node.stop_rental(rental.agreement_id)
        return rental_row(self.node, rental, await self._token())

    async def op_evidence(self, agreement_id: str) -> dict:
        """The evidence bundle of a rental of this run, or of any agreement the store holds
        (its start read from the escrow's Opened event)."""
        store = self.node.store
        try:
            rental = self._rental(agreement_id)
        except ControlError:
            rental = await self._stored_rental(agreement_id)
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
        symbol, decimals = await self._token()
        paid = min(rental.terms.deposit, rental.terms.price_per_second * status.acked_seconds)
        return {"agreement_id": rental.agreement_id.hex(), "state": status.state,
                "end_s": status.end_s, "acked_seconds": status.acked_seconds,
                "deposit": rental.terms.deposit, "token": symbol,
                "deposit_tokens": format_tokens(rental.terms.deposit, decimals),
                # the receipt rule: the provider gets the acknowledged seconds, the renter the rest
                "to_provider_tokens": format_tokens(paid, decimals),
                "to_renter_tokens": format_tokens(rental.terms.deposit - paid, decimals)}

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
        symbol, decimals = await self._token()
        paid = rental.terms.price_per_second * receipt.acked_seconds
        return {"tx": result.tx_hash, "acked_seconds": receipt.acked_seconds, "paid": paid,
                "paid_tokens": format_tokens(paid, decimals), "token": symbol}

    async def op_escrow_recover(self, agreement_id: str) -> dict:
        """Anyone, for the renter: return the whole deposit once end + grace passed unclaimed."""
        rental = self._rental(agreement_id)
        result = await self.node.chain.recover(self.node.wallet_key, rental.terms)
        symbol, decimals = await self._token()
        return {"tx": result.tx_hash, "refunded": rental.terms.deposit, "token": symbol,
                "refunded_tokens": format_tokens(rental.terms.deposit, decimals)}

    async def op_balance(self) -> dict:
        """The wallet's balances in token units: the native coin (gas), the payment token, the
        escrow credits waiting to be withdrawn, and what this node's open rentals lock."""
        n = self.node
        chain = n.chain.chain
        me = n.binding.wallet
        token = chain.token_address
        symbol, decimals = await self._token()
        native = await n.chain.run(chain.native_balance, me)
        held = await n.chain.run(chain.balance, me, token)
        credits = await n.chain.run(chain.credits, me, token)
        locked = sum(r.terms.deposit for r in n.rentals.values()
                     if r.role == "renter" and (r.session is None or not r.session.finished))
        return {"wallet": "0x" + me.hex(), "chain_id": chain.chain_id, "token": symbol,
                "token_address": "0x" + token.hex(), "token_decimals": decimals,
                "native": format_tokens(native, 18), "native_unit": "ETH",
                "balance": format_tokens(held, decimals),
                "escrow_credits": format_tokens(credits, decimals),
                "locked_in_rentals": format_tokens(locked, decimals)}

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

    async def _token(self) -> tuple[str, int]:
        """The payment token's (symbol, decimals), read from the chain once."""
        if self._token_info is None:
            chain = self.node.chain.chain
            decimals = await self.node.chain.run(chain.decimals, chain.token_address)
            self._token_info = (await self.node.chain.run(self.node._token_symbol), decimals)
        return self._token_info

    async def _stored_rental(self, prefix: str):
        """A Rental rebuilt from the store's record of an agreement not in this run's memory."""
        from .records import Rental, decode_agreement, decode_bindings

        prefix = prefix.lower().removeprefix("0x")
        found = [r for r in await self.node.store.all_agreements(limit=100_000)
                 if prefix and r.id.hex().startswith(prefix)]
        if not found:
            raise ControlError(f"no agreement {prefix!r} in this node's store (see `gpumarket "
                               "rentals --all`)", "not_found")
        if len(found) > 1:
            raise ControlError(f"{prefix!r} matches {len(found)} agreements; give more digits", "usage")
        terms, details = decode_agreement(found[0].terms)
        provider_binding, renter_binding = decode_bindings(found[0].terms)
        chain = self.node.chain.chain

        def opened_end() -> int | None:
            logs = chain._need_escrow().events.Opened().get_logs(
                from_block=0, argument_filters={"agreement_id": terms.agreement_id()})
            return int(logs[0].args.end) if logs else None

        end = await self.node.chain.run(opened_end)
        if end is None:
            raise ControlError(f"agreement {prefix} was never opened on chain: it has no evidence",
                               "not_found")
        return Rental(found[0].role, terms, details, started_s=end - terms.max_seconds,
                      provider_binding=provider_binding, renter_binding=renter_binding)

    def _rental(self, prefix: str):
        prefix = prefix.lower().removeprefix("0x")
        matches = [r for aid, r in self.node.rentals.items() if aid.hex().startswith(prefix)]
        if not prefix or not matches:
            raise ControlError(f"no rental {prefix!r} on this node (see `gpumarket rentals`)", "not_found")
        if len(matches) > 1:
            raise ControlError(f"{prefix!r} matches {len(matches)} rentals; give more digits")
        return matches[0]


def _computed_escrow() -> bytes:
    from .deterministic import escrow_address

    return escrow_address()


NOT_FOUND_CODES = frozenset({"unknown_offer", "bad_offer_id", "ambiguous_offer"})


def error_kind(exc: Exception) -> str:
    """The reply's `kind` (control_client.ControlError): what the CLI's exit code says."""
    if isinstance(exc, ControlError):
        return exc.kind
    if isinstance(exc, ChainError):
        return "chain"
    if isinstance(exc, ProtocolError) and exc.code in NOT_FOUND_CODES:
        return "not_found"
    return "refused"


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
        "addrs": list(o.addrs),
        "images": list(o.images),  # rent --image picks one (the first: the default)
        "model_token": "+".join(entry.models),
        "min_duration_s": o.terms.min_duration_s, "max_duration_s": o.terms.max_duration_s,
    }


def rental_row(node: Node, rental, token: tuple[str, int] | None = None) -> dict:
    """One rental; `token` (symbol, decimals) puts its money in token units."""
    session = rental.session
    machine = session.machine if session is not None else None
    acked = getattr(machine, "acked_seconds", 0) if machine is not None else 0
    state = machine.state if machine is not None else "pending"
    elapsed = max(0, now_ms() // 1000 - (rental.started_s or now_ms() // 1000))
    if rental.closed_end_s is not None and rental.started_s is not None:
        elapsed = min(elapsed, max(0, rental.closed_end_s - rental.started_s))  # ended early: final
    elif session is not None and getattr(session, "finished", False):
        elapsed = min(elapsed, acked)  # ended: what was served, not the clock since the start
    symbol, decimals = token if token is not None else ("units", 0)
    return {
        "agreement_id": rental.agreement_id.hex(), "role": rental.role, "state": state,
        "token": symbol, "deposit_tokens": format_tokens(rental.terms.deposit, decimals),
        "cost_so_far_tokens": format_tokens(rental.terms.price_per_second * acked, decimals),
        "price_per_gpu_hour": format_tokens(
            rental.terms.price_per_second * 3600 // max(1, len(rental.details.gpus)), decimals),
        "provider": short_id(rental.details.provider_key), "gpus": len(rental.details.gpus),
        "max_seconds": rental.terms.max_seconds, "elapsed_s": min(elapsed, rental.terms.max_seconds),
        "acked_seconds": acked, "deposit": rental.terms.deposit,
        "cost_so_far": rental.terms.price_per_second * acked,
        "heartbeats": session.log.heartbeats if session else 0,
        "receipts": session.log.receipts if session else 0, "live": True,
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
