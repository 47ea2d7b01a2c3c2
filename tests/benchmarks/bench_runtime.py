"""The rental's container: time to the first byte of `run`, teardown, forward throughput and a
shell keystroke's round trip.

Run from the repository root (a Docker daemon must answer; the test image is built FROM scratch
with the host's static busybox, nothing is pulled):
    PYTHONPATH=. python tests/benchmarks/bench_runtime.py [--rentals 5] [--forward-mib 64]
        [--keystrokes 100]

One provider node (fake GPUs, the Docker runtime with no GPU request) and one renter node with
its control socket in this process, libp2p on 127.0.0.1, the embedded EVM (py-evm in-process,
not anvil: a devnet adds its own block time to `rent`). Both nodes share one Python thread, so
every stream figure includes both ends' CPU. Measured:
- first_byte: from `Node.rent()` returning (escrow open mined) to the first byte of
  `run RENTAL -- echo` output at the renter's control socket: the rental hello, StartService, the
  container's creation and start, the exec (the image is present).
- teardown: from `stop_rental()` (the renter's close mined) until the container is gone: the
  provider's chain watcher seeing `Closed` (polls every 0.3 s here), StopService, the removal.
- forward: one connection reading --forward-mib MiB from `nc` in the container through
  `gpumarket forward`'s path (local TCP -> control socket -> renter node -> libp2p (Noise, yamux)
  -> provider -> the container's bridge address), against, in the same run: plain TCP on
  loopback (a trio server), the container's address read directly from the host, and a bare
  libp2p stream between the two hosts (the Noise + yamux ceiling without our relays), and that
  stream fed by the same container source as forward (what the renter's relays cost).
- keystroke: in a `shell` session, one byte typed to its echo by the container's terminal.
Prints one line per figure, then one JSON line (the last line).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import trio
from libp2p.custom_types import TProtocol

from node.access import STDOUT, copy_trio_to_p2p, exec_session, forward_listen
from node.chain import AsyncChain, Chain
from node.control import SOCKET_NAME, ControlServer
from node.demo import DEMO_PARAMS, PROVIDERS, fake_gpus
from node.node import Node, NodeConfig, ProviderSettings
from node.runtime import LABEL_AGREEMENT, DockerSettings
from protocol.eth import private_key_address
from tests.docker_image import busybox_image, docker_client, no_daemon_reason

MIB = 1024 * 1024
PARAMS = __import__("dataclasses").replace(DEMO_PARAMS, renter_heartbeat_timeout_intervals=5,
                                           provider_stop_after_missed_receipts=10)


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def ms(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(pct(values, 50) * 1000, 1),
            "p95_ms": round(pct(values, 95) * 1000, 1), "max_ms": round(max(values) * 1000, 1)}


async def read_all(stream: trio.abc.Stream) -> int:
    n = 0
    while data := await stream.receive_some(256 * 1024):
        n += len(data)
    return n


async def timed_read(connect, nbytes: int) -> float:
    stream = await connect()
    t0 = time.perf_counter()
    async with stream:
        got = await read_all(stream)
    dt = time.perf_counter() - t0
    assert got == nbytes, f"read {got} of {nbytes} bytes"
    return nbytes / dt / MIB


async def plain_tcp(nbytes: int) -> float:
    chunk = b"\0" * (256 * 1024)

    async def serve(stream: trio.SocketStream) -> None:
        async with stream:
            left = nbytes
            while left:
                n = min(left, len(chunk))
                await stream.send_all(chunk[:n])
                left -= n

    async with trio.open_nursery() as n:
        listeners = await n.start(trio.serve_tcp, serve, 0, )
        port = listeners[0].socket.getsockname()[1]
        rate = await timed_read(lambda: trio.open_tcp_stream("127.0.0.1", port), nbytes)
        n.cancel_scope.cancel()
    return rate


async def bare_libp2p(provider: Node, renter: Node, nbytes: int,
                      source: tuple[str, int] | None = None) -> float:
    """A stream between the two hosts, no relays: the provider writes, the renter reads. The
    provider writes zeros from memory, or with `source` what it reads from that TCP address
    (the container's nc: the same source as forward's, without the renter's relays)."""
    proto = TProtocol(f"/gpumarket/bench-bulk/{'src' if source else 'mem'}/1")
    chunk = b"\0" * (32 * 1024)

    async def handler(stream) -> None:
        if source is not None:
            tcp = await trio.open_tcp_stream(*source)
            async with tcp:
                await copy_trio_to_p2p(tcp, stream)
            return
        left = nbytes
        while left:
            n = min(left, len(chunk))
            await stream.write(chunk[:n])
            left -= n
        await stream.close()

    provider.host.host.set_stream_handler(proto, handler)
    stream = await renter.host.host.new_stream(provider.peer_id, [proto])
    t0 = time.perf_counter()
    got = 0
    while True:
        try:
            data = await stream.read(256 * 1024)
        except Exception:
            break
        if not data:
            break
        got += len(data)
    dt = time.perf_counter() - t0
    assert got == nbytes, f"read {got} of {nbytes}"
    return nbytes / dt / MIB


def serve_zeros(container, port: int, nbytes: int) -> None:
    container.exec_run(["sh", "-c", f"head -c {nbytes} /dev/zero | nc -l -p {port}"], detach=True)
    time.sleep(0.3)


async def main(args: argparse.Namespace) -> dict:
    client = docker_client()
    if client is None:
        raise SystemExit(no_daemon_reason())
    image = busybox_image()
    work = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    chain = Chain.embedded()
    keys = chain.dev_keys()
    chain.deploy_local_market(keys[0])
    chain.fund(private_key_address(keys[1]), token_units=10**12, minter_key=keys[0])
    achain = AsyncChain(chain)
    await trio.sleep(chain.lead_s())
    provider = Node(NodeConfig(work / "p", keys[2], params=PARAMS, name="provider", chain_poll_s=0.3,
                               provider=ProviderSettings(
                                   price_per_gpu_hour=Decimal("0.45"), min_duration_s=5,
                                   max_duration_s=3600, heartbeat_interval_s=1, grace_s=300,
                                   publish_interval_s=0.2, nvml=fake_gpus(PROVIDERS[0]),
                                   docker=DockerSettings(images=(image,), gpus="none", cpus=2.0,
                                                         memory_mib=1024))), achain)
    renter = Node(NodeConfig(work / "r", keys[1], params=PARAMS, name="renter", chain_poll_s=0.3),
                  achain)
    control = ControlServer(renter, renter.data_dir)
    sock = str(renter.data_dir / SOCKET_NAME)
    out: dict = {"bench": "runtime", "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
                 "chain": "embedded", "image": image}
    first_byte, teardown = [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(provider.run)
        await nursery.start(renter.run)
        await nursery.start(control.run)
        await renter.host.connect(provider.addrs()[0])

        async def rent():
            with trio.fail_after(30):
                while (e := renter.book.held(provider.key.public)) is None or not e.offer.gpus:
                    await trio.sleep(0.1)
            return await renter.rent([e], gpu_count=1, duration_s=600, max_price_per_gpu_second=125)

        for _ in range(args.rentals):
            rental = await rent()
            t0 = time.perf_counter()
            got: list[float] = []

            def on_out(kind: int, data: bytes, got=got) -> None:
                if not got:
                    got.append(time.perf_counter())

            with trio.fail_after(60):
                while True:  # until the rental's container is up and the exec accepted
                    try:
                        await exec_session(sock, control.token, rental.agreement_id.hex(), ["echo", "x"],
                                           tty=False, out=on_out)
                        break
                    except Exception:
                        await trio.sleep(0.02)
            first_byte.append(got[0] - t0)
            print(f"first byte of run output: {(got[0] - t0) * 1000:.0f} ms after rent returned", flush=True)
            aid = rental.agreement_id
            t0 = time.perf_counter()
            await renter.stop_rental(aid)
            with trio.fail_after(60):
                while client.api.containers(all=True, filters={"label": f"{LABEL_AGREEMENT}={aid.hex()}"}):
                    await trio.sleep(0.05)
            teardown.append(time.perf_counter() - t0)
            print(f"teardown: {teardown[-1] * 1000:.0f} ms from stop to the container gone", flush=True)
        out["first_byte"] = ms(first_byte)
        out["teardown"] = ms(teardown)

        # throughput and keystrokes in one more rental
        rental = await rent()
        aid = rental.agreement_id.hex()
        with trio.fail_after(60):
            while provider.rentals.get(rental.agreement_id) is None or \
                    provider.rentals[rental.agreement_id].access is None:
                await trio.sleep(0.05)
        container = client.containers.get(f"gpumarket-{aid[:16]}")
        ip = container.attrs["NetworkSettings"]["Networks"]["gpumarket"]["IPAddress"]
        nbytes = args.forward_mib * MIB
        rates: dict[str, float] = {}
        rates["plain_tcp_loopback"] = await plain_tcp(nbytes)
        serve_zeros(container, 9000, nbytes)
        rates["container_direct"] = await timed_read(lambda: trio.open_tcp_stream(ip, 9000), nbytes)
        rates["bare_libp2p_stream"] = await bare_libp2p(provider, renter, nbytes)
        serve_zeros(container, 9002, nbytes)
        rates["bare_libp2p_from_container"] = await bare_libp2p(provider, renter, nbytes, (ip, 9002))
        local = await nursery.start(forward_listen, sock, control.token, aid, 9001, 0, print)
        serve_zeros(container, 9001, nbytes)
        rates["forward"] = await timed_read(lambda: trio.open_tcp_stream("127.0.0.1", local), nbytes)
        for k, v in rates.items():
            print(f"{k}: {v:.1f} MiB/s for {args.forward_mib} MiB", flush=True)
        out["forward"] = {"mib": args.forward_mib, **{f"{k}_mib_s": round(v, 1) for k, v in rates.items()},
                          "ratio_vs_plain_tcp": round(rates["forward"] / rates["plain_tcp_loopback"], 4),
                          "ratio_vs_bare_libp2p": round(rates["forward"] / rates["bare_libp2p_stream"], 3),
                          "ratio_vs_bare_libp2p_same_source":
                              round(rates["forward"] / rates["bare_libp2p_from_container"], 3)}

        # keystrokes: type one character, wait for the terminal's echo
        send, receive = trio.open_memory_channel(0)
        seen = trio.Event()
        buf = bytearray()

        def on_shell(kind: int, data: bytes) -> None:
            buf.extend(data)
            seen.set()

        async def typed():
            async for item in receive:
                yield item

        result: list[int] = []

        async def shell():
            result.append(await exec_session(sock, control.token, aid, ["/bin/sh"], tty=True, rows=24,
                                             cols=80, input_chunks=typed(), out=on_shell))

        nursery.start_soon(shell)
        await send.send(b"echo READY\r")
        with trio.fail_after(20):
            while b"READY\r\n" not in buf:
                seen = trio.Event()
                await seen.wait()
        await trio.sleep(0.3)
        rtts = []
        for i in range(args.keystrokes):
            char = b"abcdefghij"[i % 10:i % 10 + 1]
            buf.clear()
            t0 = time.perf_counter()
            await send.send(char)
            with trio.fail_after(10):
                while char not in buf:
                    seen = trio.Event()
                    await seen.wait()
            rtts.append(time.perf_counter() - t0)
        await send.send(b"\x15exit\r")  # Ctrl-U clears the typed line
        with trio.fail_after(10):
            while not result:
                await trio.sleep(0.05)
        out["keystroke"] = ms(rtts)
        print(f"keystroke round trip: p50 {out['keystroke']['p50_ms']} ms, p95 {out['keystroke']['p95_ms']} ms",
              flush=True)
        await renter.stop_rental(rental.agreement_id)
        nursery.cancel_scope.cancel()
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser()
    parser.add_argument("--rentals", type=int, default=5)
    parser.add_argument("--forward-mib", type=int, default=64)
    parser.add_argument("--keystrokes", type=int, default=100)
    result = trio.run(main, parser.parse_args())
    print(json.dumps(result))
