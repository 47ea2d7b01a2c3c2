"""The `gpumarket` command.

`gpumarket node run` runs a node in the foreground; the other commands talk to it through the
control socket in its data directory (node/control.py). Errors a person can act on print one line
and exit non-zero; `--debug` shows tracebacks and debug logs.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import shlex
import signal
import sys
import warnings
from decimal import Decimal, InvalidOperation
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

EXIT_ERROR = 1
EXIT_USAGE = 2


class UserError(Exception):
    """A problem the person can fix; printed as one line."""


def _version() -> str:
    try:
        return version("gpumarket")
    except PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data_dir or os.environ.get("GPUMARKET_HOME") or "~/.gpumarket").expanduser()


def _config_path(args: argparse.Namespace) -> Path:
    from .config import CONFIG_NAME

    return Path(args.config).expanduser() if args.config else _data_dir(args) / CONFIG_NAME


def _password(confirm: bool = False) -> str:
    env = os.environ.get("GPUMARKET_PASSWORD")
    if env is not None:
        return env
    if not sys.stdin.isatty():
        raise UserError("the wallet keystore needs a password: set GPUMARKET_PASSWORD or run in a terminal")
    pw = getpass.getpass("wallet keystore password: ")
    if confirm and getpass.getpass("again: ") != pw:
        raise UserError("the two passwords differ")
    return pw


def _console():
    from rich.console import Console

    return Console()


def _print_json(doc) -> None:
    print(json.dumps(doc, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# init, node run


def cmd_init(args: argparse.Namespace) -> int:
    from .config import CONFIG_NAME, default_config_text
    from .identity import load_or_create_identity
    from .wallet import Wallet

    data_dir = _data_dir(args)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    identity = load_or_create_identity(data_dir / "identity.seed")
    keystore = data_dir / "wallet.json"
    if keystore.exists():
        wallet_note = "kept the existing wallet keystore"
        address = "0x" + json.loads(keystore.read_text()).get("address", "?").removeprefix("0x")
    else:
        if args.import_key_file:
            try:
                key = bytes.fromhex(Path(args.import_key_file).read_text().strip().removeprefix("0x"))
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read a hex private key from {args.import_key_file}: {exc}") from None
            wallet = Wallet.from_key(key)
            wallet_note = "imported the wallet key into an encrypted keystore"
        else:
            wallet = Wallet.create()
            wallet_note = "created a new wallet in an encrypted keystore"
        wallet.write_keystore(keystore, _password(confirm=True))
        address = wallet.checksum
    config = data_dir / CONFIG_NAME
    if not config.exists():
        config.write_text(default_config_text(data_dir, provider=args.provider))
    print(f"data directory: {data_dir}")
    print(f"peer id:        {identity.peer_id.to_base58()}")
    print(f"wallet:         {address} ({wallet_note})")
    print(f"config:         {config}")
    print("next: edit the config ([chain] rpc/escrow/token, [provider]), then `gpumarket node run`")
    return 0


def _build_chain(config, rpc_override: str | None, wallet_key: bytes):
    from .chain import Chain

    rpc = rpc_override or config.chain.rpc
    if rpc == "embedded":
        chain = Chain.embedded()
        keys = chain.dev_keys()
        chain.deploy_local_market(keys[0])
        from protocol.eth import private_key_address

        me = private_key_address(wallet_key)
        chain.fund(me, native_wei=10**19, token_units=10_000 * 10**chain.decimals(chain.token_address),
                   minter_key=keys[0])
        logging.getLogger("gpumarket").warning(
            "embedded chain: an in-process EVM that only this node can see (for trying things out)")
        return chain
    if config.chain.escrow is None:
        raise UserError("[chain] escrow is not set: the escrow contract's address is needed for "
                        f"{rpc} (or use rpc = \"embedded\")")
    return Chain.connect(rpc, chain_id=config.chain.chain_id, escrow=config.chain.escrow,
                         token=config.chain.token)


def cmd_node_run(args: argparse.Namespace) -> int:
    import trio

    from .chain import AsyncChain
    from .config import load_config
    from .control import ControlServer
    from .fake_nvml import FakeNvml
    from .node import Node, NodeConfig, ProviderSettings
    from .wallet import Wallet

    config = load_config(_config_path(args))
    wallet = Wallet.from_keystore(config.keystore_path, _password())
    chain = _build_chain(config, args.chain, wallet.key)
    provider = None
    p = config.provider
    if p.enabled or args.provider:
        provider = ProviderSettings.from_section(
            p, nvml=FakeNvml.with_gpus(p.fake_gpus) if p.fake_gpus else None)
        provider.prices(chain.decimals(chain.token_address))  # a bad price fails here, in one line
    node = Node(NodeConfig(data_dir=config.data_dir, wallet_key=wallet.key,
                           listen=tuple(args.listen or config.listen),
                           bootstrap=tuple(args.bootstrap or config.bootstrap), mdns=config.mdns,
                           announce=config.announce, arbiters=frozenset(config.renter.arbiters),
                           provider=provider, name=config.data_dir.name,
                           on_preempt=tuple(shlex.split(args.on_preempt)) if args.on_preempt else None),
                AsyncChain(chain))

    _node_logging(str(node.peer_id), args.debug)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                await nursery.start(node.run)
                await nursery.start(ControlServer(node, config.data_dir).run)
                print(json.dumps({"ready": True, "peer_id": str(node.peer_id), "addrs": node.addrs(),
                                  "wallet": "0x" + node.binding.wallet.hex(),
                                  "provider": provider is not None}), flush=True)
                async for sig in signals:
                    logging.getLogger("gpumarket").warning("signal %s: shutting down", sig)
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    return 0


def _node_logging(peer_id: str, debug: bool) -> None:
    """A running node logs what it does at INFO, each line tagged with its (short) peer id;
    py-libp2p's own chatter stays at WARNING unless --debug."""
    tag = peer_id[-8:]

    class PeerTag(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.peer = tag
            return True

    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(PeerTag())
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)-7s peer=%(peer)s %(name)s: %(message)s"))
    for name in ("node", "protocol", "gpumarket"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)


# ---------------------------------------------------------------------------------------------
# commands that talk to a running node


def _call(args: argparse.Namespace, op: str, **kw):
    from .control import call

    return call(_data_dir(args), op, **kw)


def cmd_status(args: argparse.Namespace) -> int:
    _print_json(_call(args, "status"))
    return 0


def cmd_offers_search(args: argparse.Namespace) -> int:
    from protocol.query import parse_query, parse_sort

    parse_query(args.query)  # a malformed query fails here, with a caret, before any I/O
    if args.sort:
        parse_sort(args.sort)
    rows = _call(args, "search", query=args.query, sort=args.sort, limit=args.limit)
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table(title=f"offers matching {args.query!r}" if args.query else "offers")
    for col in ("offer", "GPUs", "VRAM", "CUDA", "region", "price/GPU-h", "score", "tier", "provider"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["offer_id"], f"{r['gpus']}x {r['model']}", f"{r['vram_gib']} GiB", r["cuda"],
                      r["region"], f"{r['price_per_gpu_hour']} {r['token']}", f"{r['score']:.2f}",
                      r["tier"], r["provider"])
    _console().print(table)
    if not rows:
        print("no offers match; try a broader query, or wait for offers to arrive")
    return 0


def _seconds(args: argparse.Namespace) -> int:
    if args.seconds:
        return args.seconds
    try:
        return int(Decimal(args.hours) * 3600)
    except (InvalidOperation, TypeError):
        raise UserError(f"--hours {args.hours!r} is not a number") from None


def cmd_rent(args: argparse.Namespace) -> int:
    seconds = _seconds(args)
    quote = _call(args, "quote", offer_id=args.offer_id, seconds=seconds, gpu_count=args.gpus,
                  notice_s=args.interruptible or 0)
    o = quote["offer"]
    spot = [c for c in o.get("interruptible", []) if c["notice_s"] == args.interruptible]
    price = spot[0]["price_per_gpu_hour"] if spot else o["price_per_gpu_hour"]
    kind = f"interruptible ({args.interruptible} s notice) " if spot else ""
    print(f"renting {args.gpus}x {kind}{o['model']} from {o['provider']} for {seconds} s at "
          f"{price} {o['token']}/GPU-hour")
    print(f"this locks up to {quote['deposit_tokens']} {quote['token']} in the escrow contract; "
          "unused time is refunded")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("confirmation needed: pass --yes to rent without a prompt")
        if input("proceed? [y/N] ").strip().lower() not in ("y", "yes"):
            print("not rented")
            return EXIT_ERROR
    access_key = args.access_key
    if access_key and Path(access_key).expanduser().is_file():
        access_key = Path(access_key).expanduser().read_text().strip()
    row = _call(args, "rent", offer_id=args.offer_id, seconds=seconds, gpu_count=args.gpus,
                max_price_per_gpu_hour=args.max_price, access_key=access_key or "",
                notice_s=args.interruptible or 0, image=args.image or "")
    access = _wait_for_access(args, row["agreement_id"])
    row["access"] = access
    if args.json:
        _print_json(row)
    else:
        print(f"rented: agreement {row['agreement_id'][:16]}, deposit {row['deposit']} units locked; "
              "`gpumarket rentals` shows its progress")
        print(f"access: {access}" if access else
              "access: none received yet (the provider may not run an access hook)")
        if access and "gpumarket shell" in access:  # a container (node/runtime.py)
            short = row["agreement_id"][:16]
            print(f"  a terminal:  gpumarket shell {short}\n"
                  f"  a command:   gpumarket run {short} -- nvidia-smi -L")
    return 0


EXIT_REFUSED = 125  # run/shell: the session never started (as docker run's 125)


def _exec(args: argparse.Namespace, argv: list[str], tty: bool) -> int:
    from .access import ExecRefused, run_cli_session

    try:
        return run_cli_session(str(_data_dir(args)), args.agreement_id, argv, tty=tty)
    except ExecRefused as exc:
        print(f"gpumarket: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def cmd_run(args: argparse.Namespace) -> int:
    argv = list(args.cmd)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UserError("nothing to run: gpumarket run RENTAL -- CMD [ARG...]")
    return _exec(args, argv, tty=False)


def cmd_forward(args: argparse.Namespace) -> int:
    import trio

    from .access import forward_listen
    from .control import SOCKET_NAME, TOKEN_NAME, NoNodeRunning

    local, _, remote = args.ports.rpartition(":")
    try:
        port, local_port = int(remote), int(local or remote)
    except ValueError:
        raise UserError(f"{args.ports!r}: expected [LOCAL_PORT:]PORT") from None
    if not (1 <= port <= 65535 and 0 <= local_port <= 65535):
        raise UserError(f"{args.ports!r}: ports are 1..65535 (local 0: any free port)")
    base = _data_dir(args)
    try:
        token = (base / TOKEN_NAME).read_text().strip()
    except FileNotFoundError:
        raise NoNodeRunning(f"no node is running for {base}: start one with `gpumarket node run`") from None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(forward_listen, str(base / SOCKET_NAME), token,
                                        args.agreement_id, port, local_port,
                                        lambda why: print(f"gpumarket: {why}", file=sys.stderr))
            print(f"forwarding 127.0.0.1:{bound} -> port {port} in rental {args.agreement_id} "
                  "(Ctrl-C stops)", flush=True)

    trio.run(main)
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    from .access import ExecRefused, copy_cli

    try:
        print(copy_cli(str(_data_dir(args)), args.src, args.dst))
    except ExecRefused as exc:
        print(f"gpumarket: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    return 0


def cmd_shell(args: argparse.Namespace) -> int:
    if not sys.stdin.isatty():
        raise UserError("gpumarket shell needs a terminal; use gpumarket run RENTAL -- CMD")
    return _exec(args, [], tty=True)


def _wait_for_access(args: argparse.Namespace, agreement_id: str, timeout_s: float = 20.0):
    """The provider sends its access details when the rental stream opens: wait a little."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = [r for r in _call(args, "rentals") if r["agreement_id"] == agreement_id]
        if rows and rows[0].get("access"):
            return rows[0]["access"]
        if rows and rows[0].get("heartbeats", 0) > 0:
            return None  # serving began without a grant: the provider has no access hook
        time.sleep(0.5)
    return None


def cmd_rentals(args: argparse.Namespace) -> int:
    rows = _call(args, "rentals")
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table(title="rentals")
    for col in ("agreement", "role", "state", "GPUs", "elapsed", "acked", "cost so far", "heartbeats",
                "notice"):
        table.add_column(col)
    for r in rows:
        n = r.get("notice")
        notice = "" if n is None else f"stops in {n['time_left_s']} s ({n['detail'] or n['reason']})"
        table.add_row(r["agreement_id"][:16], r["role"], r["state"], str(r["gpus"]),
                      f"{r['elapsed_s']}/{r['max_seconds']} s", f"{r['acked_seconds']} s",
                      str(r["cost_so_far"]), str(r["heartbeats"]), notice)
    _console().print(table)
    return 0


def cmd_rental_stop(args: argparse.Namespace) -> int:
    row = _call(args, "stop", agreement_id=args.agreement_id)
    print(f"stopping {row['agreement_id'][:16]}: the escrow is closed; the provider claims for the "
          f"{row['acked_seconds']} s acknowledged and the rest comes back to you")
    return 0


def cmd_evidence_export(args: argparse.Namespace) -> int:
    doc = _call(args, "evidence", agreement_id=args.agreement_id)
    out = Path(args.output or f"evidence-{doc['agreement_id'][:16]}.bin")
    out.write_bytes(bytes.fromhex(doc["bundle"]))
    print(f"wrote {out}: {doc['heartbeats']} heartbeats, {doc['receipts']} receipts; "
          f"check it with `gpumarket evidence verify {out}`")
    return 0


def cmd_evidence_verify(args: argparse.Namespace) -> int:
    from protocol.encoding import decode
    from protocol.errors import DecodeError
    from protocol.evidence import verify_bundle
    from protocol.messages import EvidenceBundle

    try:
        bundle = decode(Path(args.file).read_bytes(), EvidenceBundle)
    except FileNotFoundError:
        raise UserError(f"no such file: {args.file}") from None
    except DecodeError as exc:
        raise UserError(f"{args.file} is not an evidence bundle: {exc}") from None
    verdict = verify_bundle(bundle)
    doc = verdict.to_json_dict()
    if args.json:
        _print_json(doc)
    else:
        for key, value in doc.items():
            print(f"{key:>24}: {value}")
    return 0 if not doc.get("invalid") else EXIT_ERROR


def cmd_escrow_status(args: argparse.Namespace) -> int:
    _print_json(_call(args, "escrow_status", agreement_id=args.agreement_id))
    return 0


def cmd_escrow_claim(args: argparse.Namespace) -> int:
    doc = _call(args, "escrow_claim", agreement_id=args.agreement_id)
    print(f"claimed {doc['acked_seconds']} s: {doc['paid']} units paid (tx {doc['tx']})")
    return 0


def cmd_escrow_recover(args: argparse.Namespace) -> int:
    doc = _call(args, "escrow_recover", agreement_id=args.agreement_id)
    print(f"recovered: {doc['refunded']} units back to the renter (tx {doc['tx']})")
    return 0


def cmd_offers_publish(args: argparse.Namespace) -> int:
    _print_json(_call(args, "publish"))
    return 0


def cmd_offers_withdraw(args: argparse.Namespace) -> int:
    _print_json(_call(args, "withdraw"))
    return 0


def cmd_gpus(args: argparse.Namespace) -> int:
    from .fake_nvml import FakeNvml
    from .gpu import GpuProbe, NoGpuError

    nvml = FakeNvml.with_gpus(args.fake) if args.fake else None
    try:
        with GpuProbe(nvml) as probe:
            facts = probe.static_facts(str(_data_dir(args)) if _data_dir(args).exists() else ".")
    except NoGpuError as exc:
        raise UserError(f"{exc} (renters need no GPU; providers cannot publish without one)") from None
    doc = {
        "driver": facts.driver_version,
        "cuda": f"{facts.cuda_driver_version // 1000}.{facts.cuda_driver_version % 1000 // 10}",
        "gpus": [{"index": g.index, "model": g.model, "vram_mib": g.vram_mib,
                  "compute_capability": "%d.%d" % g.compute_capability,
                  "pcie": f"gen{g.pcie_generation} x{g.pcie_width}", "power_limit_w": g.power_limit_w,
                  "uuid_sha256": g.uuid_sha256.hex()[:16]} for g in facts.gpus],
        "host": {"cpu_cores": facts.host.cpu_cores, "ram_mib": facts.host.ram_mib,
                 "disk_free_gib": facts.host.disk_free_gib},
        "skipped": [list(s) for s in facts.skipped],
    }
    _print_json(doc)
    return 0


def cmd_devnet(args: argparse.Namespace) -> int:
    from .anvil import find_anvil
    from .devnet import run_devnet

    if find_anvil() is None:
        raise UserError("devnet needs anvil: npm install --prefix .anvil "
                        "@foundry-rs/anvil-linux-amd64@1.7.1 (or set GPUMARKET_ANVIL)")
    return run_devnet(Path(args.dir), args.providers, args.renters)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(_console())
    return 0 if result.ok else EXIT_ERROR


# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpumarket", description="A decentralized peer-to-peer GPU rental market.")
    parser.add_argument("--version", action="version", version=f"gpumarket {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("--data-dir", help="node data directory (default $GPUMARKET_HOME or ~/.gpumarket)")
    parser.add_argument("--config", help="configuration file (default DATA_DIR/config.toml)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="run a complete local market: embedded EVM, 3 providers, 1 renter",
                       description="Runs a complete market on this machine: an in-process EVM with the "
                                   "escrow contract and a test stablecoin, three provider nodes with "
                                   "simulated GPUs and one renter node on 127.0.0.1. Exits non-zero if "
                                   "any step does not happen.")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("devnet", help="start anvil and N node processes for experiments")
    p.add_argument("--providers", type=int, default=3)
    p.add_argument("--renters", type=int, default=1)
    p.add_argument("--dir", default="./devnet", help="where the nodes' data directories go")
    p.set_defaults(func=cmd_devnet)

    p = sub.add_parser("init", help="create the node's identity, encrypted wallet and config")
    p.add_argument("--provider", action="store_true", help="enable the provider role in the config")
    p.add_argument("--import-key-file", help="import a hex private key from this file (into the keystore)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("node", help="run the node")
    nsub = p.add_subparsers(dest="node_command", metavar="SUBCOMMAND", required=True)
    r = nsub.add_parser("run", help="run the node in the foreground (Ctrl-C stops it cleanly)")
    r.add_argument("--chain", help='"embedded" or a JSON-RPC URL (overrides [chain] rpc)')
    r.add_argument("--bootstrap", action="append", help="peer multiaddr to dial (repeatable)")
    r.add_argument("--listen", action="append", help="listen multiaddr (repeatable)")
    r.add_argument("--provider", action="store_true", help="act as a provider (overrides the config)")
    r.add_argument("--on-preempt", metavar="CMD",
                   help="renter: run CMD when a provider sends a preemption notice (environment: "
                        "GPUMARKET_AGREEMENT, GPUMARKET_STOP_MS, GPUMARKET_REASON, GPUMARKET_REMAINING_MS)")
    r.set_defaults(func=cmd_node_run)

    p = sub.add_parser("status", help="what the running node is doing")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("gpus", help="what the NVML probe sees on this machine")
    p.add_argument("--fake", type=int, default=0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_gpus)

    p = sub.add_parser("offers", help="search, publish or withdraw offers")
    osub = p.add_subparsers(dest="offers_command", metavar="SUBCOMMAND", required=True)
    s = osub.add_parser("search", help="search the offer book, e.g. 'gpu=RTX_4090 vram>=24 price<=0.60'")
    s.add_argument("query", nargs="?", default="")
    s.add_argument("--sort", default="rank",
                   help="rank (default: known-good, proven on the escrow, established, new, "
                        "known-bad providers, each by price), price, -price, score, -score, "
                        "vram, count")
    s.add_argument("--limit", type=int, default=50)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_offers_search)
    s = osub.add_parser("publish", help="(provider) publish the offer now")
    s.set_defaults(func=cmd_offers_publish)
    s = osub.add_parser("withdraw", help="(provider) withdraw the offer")
    s.set_defaults(func=cmd_offers_withdraw)

    p = sub.add_parser("rent", help="negotiate, open the escrow and start renting an offer")
    p.add_argument("offer_id")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--hours", help="rental length in hours, e.g. 2 or 0.5")
    g.add_argument("--seconds", type=int)
    p.add_argument("--gpus", type=int, default=1, help="how many of the offer's GPUs")
    p.add_argument("--max-price", help="highest price per GPU-hour you accept, in token units")
    p.add_argument("--access-key", help="your public key (or a file with it) for the provider's access hook")
    p.add_argument("--interruptible", type=int, metavar="NOTICE_S",
                   help="rent the offer's interruptible GPUs with this notice (cheaper; may be preempted)")
    p.add_argument("--image", metavar="REF",
                   help="the container image to run in: one of the offer's images (default: its first)")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rent)

    p = sub.add_parser("rentals", help="this node's rentals with uptime and cost so far")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rentals)

    p = sub.add_parser("rental", help="act on one rental")
    rsub = p.add_subparsers(dest="rental_command", metavar="SUBCOMMAND", required=True)
    s = rsub.add_parser("stop", help="end a rental early and settle")
    s.add_argument("agreement_id")
    s.set_defaults(func=cmd_rental_stop)

    p = sub.add_parser("run", help="run a command in a rental's container (stdout, stderr, exit code)",
                       description="Runs CMD in the container of a rental you rent, over the rental's "
                                   "own P2P connection; its stdout and stderr stream back and its exit "
                                   "code is this command's. Piped stdin is forwarded.")
    p.add_argument("agreement_id", metavar="RENTAL", help="agreement id or a unique prefix")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("forward", help="forward a local TCP port to a port in a rental's container")
    p.add_argument("agreement_id", metavar="RENTAL", help="agreement id or a unique prefix")
    p.add_argument("ports", metavar="[LOCAL_PORT:]PORT", help="e.g. 8888 or 18888:8888")
    p.set_defaults(func=cmd_forward)
    p = sub.add_parser("cp", help="copy files into or out of a rental's container (a tar stream)",
                       description="gpumarket cp RENTAL:/path/in/container ./local-dir  or  "
                                   "gpumarket cp ./local-file-or-dir RENTAL:/existing/dir")
    p.add_argument("src")
    p.add_argument("dst")
    p.set_defaults(func=cmd_cp)
    p = sub.add_parser("shell", help="an interactive terminal in a rental's container")
    p.add_argument("agreement_id", metavar="RENTAL", help="agreement id or a unique prefix")
    p.set_defaults(func=cmd_shell)

    p = sub.add_parser("evidence", help="export or verify an evidence bundle")
    esub = p.add_subparsers(dest="evidence_command", metavar="SUBCOMMAND", required=True)
    s = esub.add_parser("export", help="write an agreement's evidence bundle to a file")
    s.add_argument("agreement_id")
    s.add_argument("-o", "--output")
    s.set_defaults(func=cmd_evidence_export)
    s = esub.add_parser("verify", help="check a bundle offline and print the verdict")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_evidence_verify)

    p = sub.add_parser("escrow", help="the on-chain side of an agreement")
    xsub = p.add_subparsers(dest="escrow_command", metavar="SUBCOMMAND", required=True)
    s = xsub.add_parser("status", help="the escrow's state for an agreement")
    s.add_argument("agreement_id")
    s.set_defaults(func=cmd_escrow_status)
    s = xsub.add_parser("claim", help="(provider) claim now with the latest stored receipt")
    s.add_argument("agreement_id")
    s.set_defaults(func=cmd_escrow_claim)
    s = xsub.add_parser("recover", help="return the deposit to the renter after end + grace, unclaimed")
    s.add_argument("agreement_id")
    s.set_defaults(func=cmd_escrow_recover)

    _register_plugin_commands(sub)
    return parser


# Commands that other packages add (the simulator's `gpumarket simulate`): each entry point in
# this group names a `register(subparsers)` function. The node never imports those packages
# itself, so a provider's node runs without the simulator's numpy, numba and matplotlib.
PLUGIN_GROUP = "gpumarket.commands"


def _register_plugin_commands(sub) -> None:
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name):
        try:
            register = ep.load()
        except ImportError as exc:  # a broken optional package must not take the node's CLI down
            logging.getLogger(__name__).warning("command %r not available: %s", ep.name, exc)
            continue
        register(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # py-libp2p leaves sockets to the garbage collector when its hosts are cancelled.
        warnings.filterwarnings("ignore", category=ResourceWarning)
    if args.command is None:
        parser.print_help()
        return 0
    from protocol.errors import ProtocolError
    from protocol.query import QueryError

    from .chain import ChainError
    from .config import ConfigError
    from .control import ControlError
    from .wallet import WalletError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, UserError) as exc:
        if args.debug:
            raise
        print(f"gpumarket: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except QueryError as exc:
        if args.debug:
            raise
        print(f"gpumarket: {exc.detail}", file=sys.stderr)
        return EXIT_USAGE
    except (ControlError, ChainError, WalletError, ProtocolError) as exc:
        if args.debug:
            raise
        print(f"gpumarket: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        print(f"gpumarket: unexpected {type(exc).__name__}: {exc} (run with --debug for details)",
              file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
