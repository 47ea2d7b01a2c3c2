"""Soak: one provider node under a mixed hostile load while an honest renter searches and rents.

Run from the repository root (anvil needed, as for the process tests):

    PYTHONPATH=. python tests/benchmarks/bench_soak.py [--seconds 600] [--rent-every 30]

Three OS processes on one anvil chain: the victim (a provider, `python -m node.process`, 4 fake
GPUs), an honest renter (`python -m node.process --rent-every`), and this process, which runs the
attackers with real libp2p hosts and raw sockets, from `--attacker-ip` (127.0.0.1 by default, the
renter's address too; 127.0.0.2 puts them on an address of their own, as on a real network):

- gossip flood: forged, expired and malformed messages on the offer topic (REJECT / IGNORE work);
- Sybil offers: valid, fat offers (8 GPUs, 4 long addresses) from fresh provider keys, for the
  market's own chain and escrow, so they pass validation, fill the book and reach the renter;
- connection churn: raw TCP connect-and-drop (half of them after a multistream header) and
  full libp2p connect/disconnect of fresh hosts;
- sync abuse: silent offer-sync streams held open and reopened, and full-book requests;
- negotiation abuse: fresh renter keys (each with a valid wallet binding, no funds) negotiate
  for the victim's GPUs and never open an escrow;
- rental hellos with random agreement ids;
- a frame that is not a protobuf RPC on a gossipsub stream, every 10 s.

Every `--rent-every` seconds the renter searches its book (the default rank order, as `offers
search`) and rents one GPU for 20 s, trying the matches of the victim's GPU model 8 at a time, at
most 32 (Sybils offer the same model, cheaper). `--attack-delay S` starts the attack S seconds
after the renter, so that it has rented from the victim before (a known provider);
`--provider-history N` gives the victim's wallet N agreements paid by other renters on the
escrow before the renter starts (a fresh renter can read that standing). Measured:
honest rents succeeded / tried (all, and those after the attack began), search time p50/p99, rent time, the victim's RSS (start, max, end),
its CPU share, whether it stayed up, and what each attacker managed to send. The last line
is JSON. Nothing here is asserted: the figures are reported as measured.

CPU share alone does not say whether a process was short of CPU on a shared machine:
`runq_wait_share` is, per 5 s sample, the share of wall time each process's main thread was
runnable but waiting for a CPU (Linux schedstat). Victim CPU share 0.2-0.3 with a wait share of
0.6-0.8 is a process that wanted a whole core and got a quarter of one.

`--stall-dump` runs node/stalldump.py in the victim and the renter: both are snapshotted every
10 s, and every renter stream open slower than 2 s snapshots both sides (task stacks, per
connection the yamux streams, windows and locks, the kernel socket queues and what the unread
bytes are). That is how the renter's stream-open timeouts under every attack were traced
(README, "Hostile peers"): on the code before node/libp2p_perf.py items 1-3 the renter returned
window credit after every read and read pubsub length prefixes a byte at a time, sending the
victim about six lone 12-byte yamux frames per gossip message it read; the victim, short of CPU,
read that connection's frames at a few per scheduling round, up to 300 KB (3,853 lone headers)
waited unread in its socket, and the renter's SYN and multistream-select waited behind them.
With items 1-11, ten minutes of every attack (`--seconds 600 --attacker-ip 127.0.0.2
--provider-history 2`) gave 20 of 20 honest rents twice (load average 7.5-11 with item 11's
first form, 2.4-7 with the final one; README).
"""

from __future__ import annotations

import argparse
from collections import Counter
import dataclasses
import ipaddress
import json
import os
import random
import signal
import socket
import sys
import tempfile
import time
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import trio
from eth_utils import keccak
from libp2p.custom_types import TProtocol
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.peer.id import ID
from libp2p.transport.tcp.tcp import TCP
from multiaddr import Multiaddr

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from node.anvil import AnvilProcess  # noqa: E402
from node.chain import Chain  # noqa: E402
from node.host import GossipHost, HostConfig  # noqa: E402
from node.identity import NodeIdentity, load_or_create_identity  # noqa: E402
from node.negotiate import NEGOTIATE_PROTOCOL, Candidate, negotiate_first  # noqa: E402
from node.offers import OFFER_TOPIC, SYNC_PROTOCOL, OfferService, encode_sync_request  # noqa: E402
from node.reqresp import close_quietly, encode_uvarint, read_frame, write_frame  # noqa: E402
from node.rentals import RENTAL_PROTOCOL  # noqa: E402
from node.wallet import Wallet  # noqa: E402
from protocol.agreement import AgreementTerms, sign_consent, sign_receipt  # noqa: E402
from protocol.identity import PeerKey, peer_id_from_public_key  # noqa: E402
from protocol.messages import Binding  # noqa: E402
from protocol.params import Params  # noqa: E402
from protocol.samples import GPU_MODELS, make_offer, make_provider  # noqa: E402
from tests.node.test_processes import NodeProc, _free_port  # noqa: E402

PRICE = 1_000  # victim's price, token units per GPU-second
MODEL = GPU_MODELS[0]  # the victim's model; Sybils offer it too
PARAMS = {"clock_skew_ms": 5_000, "min_heartbeat_interval_s": 1, "heartbeat_late_tolerance_ms": 1_000,
          "negotiation_step_timeout_ms": 5_000}
RENTER_IP = "127.0.0.1"  # the renter's (and the victim's) address; attackers use --attacker-ip


def attacker_listen(ip: str) -> tuple[str, ...]:
    return (f"/ip4/{ip}/tcp/0",)


DIALED_FROM: Counter[str] = Counter()  # source address of each attacker libp2p dial (checks dial_from)


def dial_from(host: GossipHost, ip: str) -> GossipHost:
    """Make every outbound TCP connection of this attacker's host leave from `ip` (on Linux all
    of 127.0.0.0/8 is the loopback interface), so that the victim counts it against that
    address and not the renter's. trio's `local_address` raises if the address cannot be
    bound: no silent fallback to 127.0.0.1 (py-libp2p's `dial_with_source` has one)."""
    if ip == RENTER_IP:
        return host
    for transport in host.host.get_network().transport_manager.get_transports():
        if isinstance(transport, TCP):
            async def dial(maddr: Multiaddr) -> RawConnection:
                stream = await trio.open_tcp_stream(maddr.value_for_protocol("ip4"),
                                                    int(maddr.value_for_protocol("tcp")),
                                                    local_address=ip)
                DIALED_FROM[stream.socket.getsockname()[0]] += 1
                return RawConnection(TrioTCPStream(stream), True)
            transport.dial = dial  # type: ignore[method-assign]
    return host


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(p / 100 * len(s)))], 3)


class Attack:
    """Counters of what the attackers sent and how it went."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}

        self.first_error: dict[str, str] = {}

    def count(self, name: str, n: int = 1) -> None:
        self.sent[name] = self.sent.get(name, 0) + n

    def error(self, name: str, exc: BaseException) -> None:
        self.count(name)
        self.first_error.setdefault(name, repr(exc)[:200])


async def gossip_flood(host: GossipHost, rate: float, chain_id: int, escrow: bytes, token: bytes,
                       attack: Attack, stop_at: float) -> None:
    rng = random.Random(1)
    peer, _, binding = make_provider(rng, chain_id)
    while trio.current_time() < stop_at:
        now = int(time.time() * 1000)
        offer = make_offer(peer, binding, rng, now, seq=now, escrow=escrow, token=token)
        kind = rng.randrange(3)
        if kind == 0:  # forged: a changed price under the old signature (REJECT bad_signature)
            forged = dataclasses.replace(offer, terms=dataclasses.replace(offer.terms, price_per_gpu_second=1))
            payload = forged.encode()
        elif kind == 1:  # expired (IGNORE)
            payload = make_offer(peer, binding, rng, now - 3 * 3_600_000, seq=now,
                                 lifetime_ms=3_600_000, escrow=escrow, token=token).encode()
        else:  # malformed msgpack (REJECT malformed)
            payload = b"\xc1" + rng.randbytes(40)
        try:
            await host.publish(OFFER_TOPIC, payload)
            attack.count("flood")
        except Exception as exc:
            attack.error("flood_error", exc)
        await trio.sleep(1 / rate)


def fat_sybil_offer(rng: random.Random, chain_id: int, escrow: bytes, token: bytes) -> bytes:
    peer, _, binding = make_provider(rng, chain_id)
    now = int(time.time() * 1000)
    offer = make_offer(peer, binding, rng, now, seq=now, model=MODEL, gpu_count=8,
                       price_per_gpu_second=rng.randint(1, PRICE - 1), escrow=escrow, token=token,
                       lifetime_ms=3_600_000, heartbeat_interval_s=1)
    pid = peer_id_from_public_key(peer.public)
    addrs = tuple(f"/dns4/{'x' * (60 - len(pid))}{i}.example/tcp/4001/p2p/{pid}"[:128] for i in range(4))
    return dataclasses.replace(offer, addrs=addrs).sign(peer).encode()


async def sybils(host: GossipHost, rate: float, chain_id: int, escrow: bytes, token: bytes,
                 attack: Attack, stop_at: float) -> None:
    rng = random.Random(2)
    while trio.current_time() < stop_at:
        payload = fat_sybil_offer(rng, chain_id, escrow, token)
        try:
            await host.publish(OFFER_TOPIC, payload)
            attack.count("sybil_offers")
            attack.count("sybil_bytes", len(payload))
        except Exception as exc:
            attack.error("sybil_error", exc)
        await trio.sleep(1 / rate)


def _tcp_connect_drop(port: int, header: bool, source_ip: str) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2,
                                      source_address=(source_ip, 0)) as s:
            if header:
                s.sendall(b"\x13/multistream/1.0.0\n")
        return True
    except OSError:
        return False


async def churn(port: int, rate: float, source_ip: str, attack: Attack, stop_at: float) -> None:
    n = 0
    while trio.current_time() < stop_at:
        ok = await trio.to_thread.run_sync(_tcp_connect_drop, port, n % 2 == 0, source_ip)
        attack.count("tcp_churn" if ok else "tcp_churn_refused")
        n += 1
        await trio.sleep(1 / rate)


async def libp2p_churn(victim_addr: str, every_s: float, source_ip: str, attack: Attack,
                       stop_at: float) -> None:
    """Fresh hosts that complete Noise + yamux, then go away (each one a new peer id)."""
    rng = random.Random(3)
    while trio.current_time() < stop_at:
        host = dial_from(GossipHost(NodeIdentity.from_seed(rng.randbytes(32)),
                                    HostConfig(listen_addrs=attacker_listen(source_ip))), source_ip)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                with trio.move_on_after(10):
                    await host.connect(victim_addr)
                    attack.count("libp2p_churn")
                nursery.cancel_scope.cancel()
        except Exception as exc:
            attack.error("libp2p_churn_error", exc)
        await trio.sleep(every_s)


@asynccontextmanager
async def attack_stream(host: GossipHost, victim: ID, protocol: str):
    """A stream to the victim, opened within 5 s and always closed (a leaked stream counts
    against yamux's stream limit, and the attack would then stall on its own side)."""
    with trio.fail_after(5):
        stream = await host.host.new_stream(victim, [TProtocol(protocol)])
    try:
        yield stream
    finally:
        await close_quietly(stream)


async def sync_abuse(host: GossipHost, victim: ID, silent: int, attack: Attack, stop_at: float) -> None:
    async def hold_silent() -> None:
        while trio.current_time() < stop_at:
            try:
                async with attack_stream(host, victim, SYNC_PROTOCOL) as stream:
                    attack.count("sync_silent")
                    with trio.move_on_after(30):
                        try:
                            await stream.read(1)  # wait until the victim cuts it
                        except Exception:
                            attack.count("sync_silent_cut")
            except Exception as exc:
                attack.error("sync_silent_error", exc)
                await trio.sleep(0.5)

    async def full_requests() -> None:
        while trio.current_time() < stop_at:
            try:
                async with attack_stream(host, victim, SYNC_PROTOCOL) as stream:
                    await write_frame(stream, encode_sync_request(0), max_frame=64)
                    got = 0
                    with trio.move_on_after(30):
                        while True:
                            frame = await read_frame(stream, max_frame=1 << 20, timeout=30)
                            got += len(frame)
                            if frame == b"\x90":
                                break
                    attack.count("sync_full")
                    attack.count("sync_full_bytes", got)
            except Exception as exc:
                attack.error("sync_full_refused", exc)
            await trio.sleep(0.2)

    async with trio.open_nursery() as nursery:
        for _ in range(silent):
            nursery.start_soon(hold_silent)
        nursery.start_soon(full_requests)


async def negotiation_abuse(host: GossipHost, victim_offer, params: Params, chain_id: int,
                            every_s: float, attack: Attack, stop_at: float) -> None:
    rng = random.Random(4)
    while trio.current_time() < stop_at:
        offer = victim_offer()
        if offer is not None:
            key = PeerKey(rng.randbytes(32))
            binding = Binding.create(key, rng.randbytes(32), chain_id)  # a fresh, unfunded wallet
            try:
                group = await negotiate_first(
                    host, key, binding, [Candidate(offer.offer, offer.digest)], gpu_count=1,
                    duration_s=60, max_price_per_gpu_second=PRICE, access_key="", params=params,
                    rng=rng)
                attack.count("negotiation_accepted" if group.winner else "negotiation_refused")
            except Exception as exc:
                attack.error("negotiation_error", exc)
        await trio.sleep(every_s)


async def rental_hellos(host: GossipHost, victim: ID, rate: float, attack: Attack, stop_at: float) -> None:
    rng = random.Random(5)
    while trio.current_time() < stop_at:
        try:
            async with attack_stream(host, victim, RENTAL_PROTOCOL) as stream:
                with trio.fail_after(5):
                    await write_frame(stream, rng.randbytes(32), max_frame=4096)
                attack.count("rental_hello_sent")
                with trio.move_on_after(2):
                    try:
                        await stream.read(1)  # the victim answers an unknown id by closing it
                    except Exception:
                        attack.count("rental_hello_cut")
        except Exception as exc:
            attack.error("rental_hello_error", exc)
        await trio.sleep(1 / rate)


async def bad_protobuf(host: GossipHost, victim: ID, every_s: float, attack: Attack, stop_at: float) -> None:
    """A pubsub stream carrying a frame that is not a protobuf RPC (py-libp2p 0.8.1 let the
    DecodeError end the process)."""
    rng = random.Random(6)
    while trio.current_time() < stop_at:
        try:
            async with attack_stream(host, victim, "/meshsub/1.1.0") as stream:
                junk = b"\xff" + rng.randbytes(64)
                with trio.fail_after(5):
                    await stream.write(encode_uvarint(len(junk)) + junk)
                attack.count("bad_protobuf")
        except Exception as exc:
            attack.error("bad_protobuf_error", exc)
        await trio.sleep(every_s)


PROBE_IP = "127.0.0.3"  # the probe's own address: neither the renter's nor the attackers'


async def probe(victim_addr: str, victim: ID, every_s: float, results: list, stop_at: float) -> None:
    """An honest bystander on its own address: every `every_s`, the time to open a ping stream
    and a negotiation stream (yamux + multistream-select on the victim; the latter is closed
    unused) on a kept connection whose host follows the offer topic as the renter's does, and to
    dial a fresh connection (TCP + Noise + yamux) with a new peer id and ping there; None = not
    within 5 s. Tells a victim that answers nobody from one that answers everyone but the
    renter."""
    rng = random.Random(7)

    async def open_close(host: GossipHost, protocol: str) -> float | None:
        t0 = trio.current_time()
        with trio.move_on_after(5):
            try:
                stream = await host.host.new_stream(victim, [TProtocol(protocol)])
            except Exception:
                return None
            await close_quietly(stream)
            return round((trio.current_time() - t0) * 1000, 1)
        return None

    async def ping_stream(host: GossipHost) -> float | None:
        t0 = trio.current_time()
        with trio.move_on_after(5):
            try:
                stream = await host.host.new_stream(victim, [TProtocol("/ipfs/ping/1.0.0")])
            except Exception:
                return None
            try:
                await stream.write(b"\0" * 32)
                await stream.read(32)
            finally:
                await close_quietly(stream)
            return round((trio.current_time() - t0) * 1000, 1)
        return None

    async with trio.open_nursery() as nursery:
        kept = dial_from(GossipHost(NodeIdentity.from_seed(keccak(b"probe")),
                                    HostConfig(listen_addrs=attacker_listen(PROBE_IP))), PROBE_IP)
        await nursery.start(kept.run)
        await nursery.start(OfferService(kept, None, Params(**PARAMS)).run)  # on the offer topic
        with trio.move_on_after(10):
            await kept.connect(victim_addr)
        while trio.current_time() < stop_at:
            kept_ms = await ping_stream(kept)
            negotiate_ms = await open_close(kept, NEGOTIATE_PROTOCOL)
            fresh_ms = None
            fresh = dial_from(GossipHost(NodeIdentity.from_seed(rng.randbytes(32)),
                                         HostConfig(listen_addrs=attacker_listen(PROBE_IP))), PROBE_IP)
            async with trio.open_nursery() as n:
                await n.start(fresh.run)
                t0 = trio.current_time()
                with trio.move_on_after(5):
                    try:
                        await fresh.connect(victim_addr)
                        if await ping_stream(fresh) is not None:
                            fresh_ms = round((trio.current_time() - t0) * 1000, 1)
                    except Exception:
                        pass
                n.cancel_scope.cancel()
            results.append((round(trio.current_time(), 1), kept_ms, negotiate_ms, fresh_ms,
                            conn_state(kept, victim)))
            await trio.sleep(every_s)
        nursery.cancel_scope.cancel()


def conn_state(host: GossipHost, peer: ID) -> dict | None:
    """The probe's side of its yamux connection to `peer`: open streams, free outbound-stream
    backlog slots (py-libp2p 0.8.1 allows 256) and bytes received but not yet read."""
    for conn in host.host.get_network().get_connections(peer):
        m = conn.muxed_conn
        try:
            return {"streams": len(m.streams), "backlog_free": m.stream_backlog_semaphore.value,
                    "unread": sum(len(b) for b in m.stream_buffers.values())}
        except AttributeError:
            return None
    return None


class Victim:
    """RSS and CPU of the victim process, sampled."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.samples: list[tuple[float, int, float]] = []  # (t, rss, cpu seconds)
        self.waits: list[float] = []  # seconds its main thread was runnable but not running

    def wait_share(self) -> list[float]:
        """Per sample interval, the share of wall time the process's main thread waited in
        the OS run queue (other processes had the CPUs): 0.5 = it could have run half as long
        again."""
        return [round((w1 - w0) / max(b[0] - a[0], 1e-9), 2) for (w0, w1), (a, b) in
                zip(zip(self.waits, self.waits[1:]), zip(self.samples, self.samples[1:]))]

    def sample(self) -> bool:
        try:
            t = self.proc.cpu_times()
            self.samples.append((time.monotonic(), self.proc.memory_info().rss, t.user + t.system))
            try:  # Linux schedstat: on-CPU ns, run-queue wait ns, timeslices
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/schedstat") as f:
                    self.waits.append(int(f.read().split()[1]) / 1e9)
            except (OSError, ValueError, IndexError):
                pass
            return True
        except psutil.NoSuchProcess:
            return False


def provider_history(chain: Chain, wallets: dict, n: int, anvil: AnvilProcess) -> list[int]:
    """The victim's past: `n` agreements between its wallet and `n` other renter wallets,
    opened and claimed on the escrow (what n earlier honest rentals leave on chain; the victim
    node sees Opened events of agreements it does not know, and ignores them). The gas each
    open + claim used is returned."""
    gas = []
    provider = wallets["provider"]
    for i in range(n):
        renter = Wallet.from_key(keccak(b"soak past renter %d" % i))
        anvil.fund(renter.address, 10**21)
        t = AgreementTerms(provider=provider.address, renter=renter.address,
                           token=chain.token_address, price_per_second=PRICE, max_seconds=600,
                           heartbeat_interval=30, grace=600, arbiter=b"\0" * 20, dispute_window=0,
                           details_hash=keccak(b"soak past %d" % i), open_by=chain.now_s() + 120)
        chain.fund(renter.address, token_units=t.deposit, minter_key=wallets["deployer"].key)
        opened = chain.open(renter.key, t, sign_consent(provider.key, chain.domain, t))
        claimed = chain.claim(provider.key, t, 300,
                              sign_receipt(renter.key, chain.domain, t.agreement_id(), 300))
        gas.append(opened.gas_used + claimed.gas_used)
    return gas


async def main(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    if args.book_max_bytes is not None:  # both nodes (and the attackers' own book)
        PARAMS["book_max_bytes"] = args.book_max_bytes
    with AnvilProcess() as anvil:
        wallets = {n: Wallet.from_key(keccak(b"soak wallet " + n.encode()))
                   for n in ("deployer", "provider", "renter")}
        for w in wallets.values():
            anvil.fund(w.address, 10**21)
        chain = Chain.connect(anvil.url, chain_id=anvil.chain_id)
        escrow, token = chain.deploy_local_market(wallets["deployer"].key)
        chain = Chain.connect(anvil.url, escrow=escrow, token=token)
        chain.fund(wallets["renter"].address, token_units=10**15, minter_key=wallets["deployer"].key)
        chain.w3.provider.make_request("evm_setIntervalMining", [1])

        def start(name: str, role: str, *extra: str) -> NodeProc:
            key_file = tmp / f"{name}.key"
            key_file.write_text(wallets[name].key.hex())
            return NodeProc(tmp, name, [
                "--data-dir", str(tmp / name), "--chain-url", anvil.url, "--escrow", escrow.hex(),
                "--token", token.hex(), "--wallet-key-file", str(key_file), "--role", role,
                "--name", name, "--params", json.dumps(PARAMS), *extra])

        if args.stall_dump:  # node/stalldump.py in both processes; the renter signals the victim
            os.environ["GPUMARKET_STALL_DUMP"] = str(tmp / "provider.stall.jsonl")
            os.environ["GPUMARKET_STALL_AFTER"] = "0"  # the victim dumps when the renter asks
        port = _free_port()
        listen = f"/ip4/127.0.0.1/tcp/{port}"
        victim_peer = load_or_create_identity(tmp / "provider" / "identity.seed").peer_id
        victim_key = victim_peer.extract_public_key().to_bytes()
        victim_addr = f"{listen}/p2p/{victim_peer}"
        provider = start("provider", "provider", "--listen", listen, "--fake-gpus", "4",
                         "--gpu-model", MODEL.name, "--price", str(PRICE), "--heartbeat-interval", "1",
                         "--grace", "600", "--min-duration", "5", "--book-stats-every", "5")
        provider.wait("ready", 60)
        history_gas = provider_history(chain, wallets, args.provider_history, anvil)
        if args.stall_dump:
            os.environ["GPUMARKET_STALL_DUMP"] = str(tmp / "renter.stall.jsonl")
            os.environ["GPUMARKET_STALL_PEER_PID"] = str(provider.proc.pid)
            os.environ["GPUMARKET_STALL_AFTER"] = "2.0"
        rounds = int((args.attack_delay + args.seconds) // args.rent_every)
        renter = start("renter", "renter", "--bootstrap", victim_addr,
                       "--rent", "gpu=RTX_4090", "--duration", "20",
                       "--max-price", str(PRICE), "--rent-every", str(args.rent_every),
                       "--rent-rounds", str(rounds), "--rent-candidates", "8",
                       "--watch-provider", victim_key.hex())
        renter.wait("ready", 60)
        victim = Victim(provider.proc.pid)
        renter_proc = Victim(renter.proc.pid)  # the same samples, for the renter's CPU share
        renter_proc.sample()
        victim.sample()
        attack = Attack()
        params = Params(**PARAMS)
        rounds_seen: list[dict] = []
        victim_book: list[tuple] = []  # (s since t_start, offers, bytes, book_full)
        t_start = time.monotonic()

        async with trio.open_nursery() as nursery:
            hosts = []
            for i in range(4):
                h = dial_from(GossipHost(NodeIdentity.from_seed(keccak(b"attacker %d" % i)),
                                         HostConfig(listen_addrs=attacker_listen(args.attacker_ip))),
                              args.attacker_ip)
                await nursery.start(h.run)
                await h.connect(victim_addr)
                hosts.append(h)
            if args.attacker_ip != RENTER_IP and set(DIALED_FROM) != {args.attacker_ip}:
                raise SystemExit(f"attackers dialled from {dict(DIALED_FROM)}, not {args.attacker_ip}")
            # the attackers' own offer book, to learn the victim's current offer and digest
            svc = OfferService(hosts[0], None, params)
            await nursery.start(svc.run)
            synced = await svc.sync([victim_peer])
            print(f"attackers synced from the victim: {synced}", flush=True)

            def victim_offer():
                return svc.book.held(victim_key)

            attack_at = trio.current_time() + args.attack_delay
            attack_at_s = time.monotonic() - t_start + args.attack_delay  # on t_start's clock
            stop_at = attack_at + args.seconds
            vpid = victim_peer

            chosen = set(args.attacks.split(","))

            async def attacks() -> None:
                await trio.sleep_until(attack_at)
                async with trio.open_nursery() as n:
                    def run(name, *a):
                        if name in chosen:
                            n.start_soon(*a)
                    run("flood", gossip_flood, hosts[0], args.flood_rate, anvil.chain_id, escrow,
                        token, attack, stop_at)
                    # the Sybil publisher does nothing else: the other attacks get their hosts
                    # graylisted, and then nothing of theirs reaches validation
                    run("sybil", sybils, hosts[2], args.sybil_rate, anvil.chain_id, escrow, token,
                        attack, stop_at)
                    run("churn", churn, port, args.churn_rate, args.attacker_ip, attack, stop_at)
                    run("churn", libp2p_churn, victim_addr, 5.0, args.attacker_ip, attack, stop_at)
                    run("sync", sync_abuse, hosts[1], vpid, 8, attack, stop_at)
                    run("negotiation", negotiation_abuse, hosts[0], victim_offer, params,
                        anvil.chain_id, 1.0, attack, stop_at)
                    run("hello", rental_hellos, hosts[1], vpid, args.hello_rate, attack, stop_at)
                    run("protobuf", bad_protobuf, hosts[3], vpid, 10.0, attack, stop_at)

            nursery.start_soon(attacks)
            probes: list = []
            if args.probe_every > 0:
                nursery.start_soon(probe, victim_addr, victim_peer, args.probe_every, probes,
                                   stop_at)

            alive = True
            while trio.current_time() < stop_at + 40:
                await trio.sleep(5)
                alive = victim.sample() and alive
                if args.stall_dump and int(time.monotonic() - t_start) % 10 < 5:
                    for proc in (provider, renter):  # a periodic snapshot of both sides
                        if proc.proc.poll() is None:
                            proc.proc.send_signal(signal.SIGUSR2)
                renter_proc.sample()
                while not provider.events.empty():
                    ev = provider.events.get_nowait()
                    if ev.get("event") == "book":
                        victim_book.append((round(time.monotonic() - t_start, 1),
                                            ev["offers"], ev["bytes"], ev["book_full"]))
                while not renter.events.empty():
                    ev = renter.events.get_nowait()
                    if ev.get("event") == "round":
                        rounds_seen.append(ev)
                        if args.progress:
                            print(json.dumps(ev), flush=True)
                if args.progress:
                    t, rss, cpu = victim.samples[-1]
                    print(f"t={t - t_start:.0f}s victim rss={rss >> 20} MiB cpu={cpu:.1f}s "
                          f"attack={attack.sent}", flush=True)
                if len(rounds_seen) >= rounds and trio.current_time() >= stop_at:
                    break
            nursery.cancel_scope.cancel()

        victim_up = provider.proc.poll() is None
        stop_s = None
        if victim_up:
            stop_s = provider.terminate(10)
        renter.close()
        provider.close()

    (t0, rss0, cpu0), (t1, rss1, cpu1) = victim.samples[0], victim.samples[-1]
    cap = Params(**PARAMS).book_max_bytes
    # the victim's book reached its byte cap: the first `book` event with an offer refused
    # book_full (the cap refuses; nothing else does) or within one fat offer of the cap
    at_cap = next((b for b in victim_book if b[3] > 0 or b[2] > cap - 16_384), None)
    t_cap = None if at_cap is None else t_start + at_cap[0]
    ok = [r for r in rounds_seen if r.get("ok")]
    # round n runs (n + 1) * rent_every after the renter started, about when the attack clock did
    attacked = [r for r in rounds_seen if (r["round"] + 1) * args.rent_every >= args.attack_delay]
    errors: dict[str, int] = {}
    for r in rounds_seen:
        if not r.get("ok"):
            errors[r["error"][:120]] = errors.get(r["error"][:120], 0) + 1
    return {
        "seconds": args.seconds,
        "attack_delay_s": args.attack_delay,
        "provider_history": args.provider_history,
        "attacks": args.attacks,
        "attacker_ip": args.attacker_ip,
        "attacker_dials_from": dict(DIALED_FROM),
        "provider_history_gas": history_gas,
        "honest_rents": {"ok": len(ok), "tried": len(rounds_seen), "errors": errors},
        "honest_rents_under_attack": {"ok": sum(1 for r in attacked if r.get("ok")),
                                      "tried": len(attacked)},
        "search_ms": {"p50": pct([r["search_ms"] for r in rounds_seen], 50),
                      "p99": pct([r["search_ms"] for r in rounds_seen], 99),
                      "max": pct([r["search_ms"] for r in rounds_seen], 100)},
        "rent_s": {"p50": pct([r["rent_s"] for r in ok], 50), "max": pct([r["rent_s"] for r in ok], 100)},
        "renter_book": [r["book"] for r in rounds_seen][-1:] or None,
        # per round: did the renter's book hold the victim's offer, and where did it rank
        "victim_in_renter_book": [(r.get("watched") or {}).get("held") for r in rounds_seen],
        "victim_hit_index": [(r.get("watched") or {}).get("hit_index") for r in rounds_seen],
        "renter_gossip_drops": (rounds_seen[-1].get("drops") if rounds_seen else None),
        # CPU seconds per second of the renter process per 5 s sample (1.0: one core busy)
        "renter_cpu_share": [round((b[2] - a[2]) / max(b[0] - a[0], 1e-9), 2)
                             for a, b in zip(renter_proc.samples, renter_proc.samples[1:])],
        # per 5 s sample: share of wall time each process's main thread was runnable but
        # waiting for a CPU (load from other processes on the machine)
        "runq_wait_share": {"victim": victim.wait_share(), "renter": renter_proc.wait_share()},
        "victim": {"up": victim_up, "rss_start_mib": rss0 >> 20,
                   "rss_max_mib": max(s[1] for s in victim.samples) >> 20, "rss_end_mib": rss1 >> 20,
                   "cpu_share": round((cpu1 - cpu0) / max(t1 - t0, 1e-9), 3),
                   "sigterm_exit_s": None if stop_s is None else round(stop_s, 2),
                   # times below are seconds since the attackers started connecting; the
                   # attack began at attack_at_s
                   "attack_at_s": round(attack_at_s, 1),
                   # RSS every 30 s: (s, MiB)
                   "rss_timeline_mib": [(round(t - t_start), r >> 20) for i, (t, r, _) in
                                        enumerate(victim.samples) if i % 6 == 0],
                   "book_max_bytes": cap,
                   # the first book event at the cap: (s, offers, bytes, book_full so far), the
                   # victim's RSS then, and the last book event
                   "book_at_cap": at_cap,
                   "rss_at_cap_mib": None if t_cap is None else next(
                       (r >> 20 for t, r, _ in victim.samples if t >= t_cap), None),
                   "book_end": victim_book[-1] if victim_book else None},
        # (seconds since the attack began, ms to a ping stream and to a negotiation stream on a
        # kept connection that follows the offer topic, ms to a fresh connection and a ping
        # stream on it; null = not within 5 s; then the kept connection's yamux state), from
        # PROBE_IP
        "probe": [(round(p[0] - attack_at, 1), *p[1:]) for p in probes],
        "attack": attack.sent,
        "attack_first_errors": attack.first_error,
        "logs": str(tmp),
    }


ALL_ATTACKS = "flood,sybil,churn,sync,negotiation,hello,protobuf"


def loopback_ip(text: str) -> str:
    ip = ipaddress.IPv4Address(text)
    if not ip.is_loopback:
        raise argparse.ArgumentTypeError(f"{text} is not a 127.0.0.0/8 address")
    return str(ip)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--rent-every", type=float, default=30.0)
    p.add_argument("--flood-rate", type=float, default=200.0, help="bad gossip messages per second")
    p.add_argument("--sybil-rate", type=float, default=20.0, help="fat Sybil offers per second")
    p.add_argument("--churn-rate", type=float, default=20.0, help="TCP connect/drop per second")
    p.add_argument("--hello-rate", type=float, default=20.0, help="rental hellos per second")
    p.add_argument("--attack-delay", type=float, default=0.0,
                   help="start the attack this long after the renter (a renter that rented "
                        "before the attack knows the provider: its rank sort puts it first)")
    p.add_argument("--provider-history", type=int, default=0,
                   help="before the renter starts, this many agreements between the victim's "
                        "wallet and as many other renter wallets are opened and claimed on the "
                        "escrow (a provider with a paid past: 2 or more make its wallet proven, "
                        "specs/offerbook.md 'Standing'); 0: a provider nobody has paid yet")
    p.add_argument("--attacks", default=ALL_ATTACKS,
                   help="comma-separated attacks to run (default: all): " + ALL_ATTACKS)
    p.add_argument("--attacker-ip", default=RENTER_IP, type=loopback_ip,
                   help="the 127.x.y.z address every attacker connection leaves from (default "
                        "127.0.0.1: the renter's own, so the connection attacks (churn, sync, "
                        "hello) also fill the victim's per-IP inbound limit against the renter; "
                        "127.0.0.2: attacker and renter on different addresses, as on a network)")
    p.add_argument("--probe-every", type=float, default=10.0,
                   help="an honest bystander at " + PROBE_IP + " opens a ping stream to the victim "
                        "this often (on a kept connection and on a fresh one); 0: off")
    p.add_argument("--book-max-bytes", type=int, default=None,
                   help="book_max_bytes of both nodes (default: Params', 128 MiB); a small cap "
                        "with a high --sybil-rate shows the RSS bound within a short run")
    p.add_argument("--progress", action="store_true")
    p.add_argument("--stall-dump", action="store_true",
                   help="node/stalldump.py in the victim and the renter: each renter stream open "
                        "that takes over 2 s dumps both sides' task stacks and yamux state to "
                        "provider.stall.jsonl and renter.stall.jsonl in the logs directory, "
                        "and both are dumped every 10 s")
    return p.parse_args(argv)


if __name__ == "__main__":
    result = trio.run(main, parse_args())
    print(json.dumps(result))
