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
from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from pathlib import Path

# Exit codes (README, "Exit codes"): every command, with or without --json.
EXIT_OK = 0
EXIT_REFUSED = 1  # the node, a peer, the chain's rules or the person said no (funds, unreachable)
EXIT_USAGE = 2  # bad arguments or configuration: fix the command line or the config
EXIT_NOT_FOUND = 3  # no node running, no such offer, rental or file
EXIT_CHAIN = 4  # the chain refused a transaction or cannot be reached
EXIT_INTERNAL = 5  # a bug: an unexpected error (run with --debug)
EXIT_ERROR = EXIT_REFUSED
EXIT_CODES = {"refused": EXIT_REFUSED, "usage": EXIT_USAGE, "not_found": EXIT_NOT_FOUND,
              "chain": EXIT_CHAIN, "internal": EXIT_INTERNAL}


class UserError(Exception):
    """A problem the person can fix; printed as one line. `kind`: an EXIT_CODES key."""

    def __init__(self, message: str, kind: str = "usage") -> None:
        super().__init__(message)
        self.kind = kind


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

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
    if args.network:
        _with_network("", args.network)  # an unknown name fails before anything is created
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
        text = default_config_text(data_dir, provider=args.provider)
        if args.network:
            text = _with_network(text, args.network)
        config.write_text(text)
    elif args.network:
        raise UserError(f"{config} exists already: edit its [chain] section, or move it away and "
                        f"run `gpumarket init --network {args.network}` again")
    if args.json:
        _print_json({"data_dir": str(data_dir), "peer_id": identity.peer_id.to_base58(),
                     "wallet": address, "wallet_note": wallet_note, "config": str(config)})
        return 0
    print(f"data directory: {data_dir}")
    print(f"peer id:        {identity.peer_id.to_base58()}")
    print(f"wallet:         {address} ({wallet_note})")
    print(f"config:         {config}")
    print("next: edit the config ([chain] rpc/escrow/token, [provider]), then `gpumarket node run`")
    return 0


def _with_network(text: str, name: str) -> str:
    """The default config with the known network's chain settings and bootstrap peers."""
    from .networks import UnknownNetwork, chain_section, network

    try:
        net = network(name)
    except UnknownNetwork as exc:
        raise UserError(str(exc)) from None
    text = text.replace('rpc = "embedded"        # "embedded" (an in-process EVM for this node alone) or a JSON-RPC URL\n', "")
    text = text.replace("[chain]\n", "[chain]\n" + chain_section(name) + "\n", 1)
    text = text.replace("# chain_id = 31337      # checked against the endpoint\n", "")
    text = text.replace("# escrow = \"0x...\"      # the escrow contract's address on that chain\n", "")
    text = text.replace("# token = \"0x...\"       # the ERC-20 offers are priced in (none: the native coin)\n", "")
    return text.replace("bootstrap = []", f"bootstrap = {json.dumps(net['bootstrap'])}", 1)


def _build_chain(config, rpc_override: str | None, wallet_key: bytes):
    from .chain import Chain

    rpc = rpc_override or config.chain.rpc
    if rpc == "embedded":
        chain = Chain.embedded()
        keys = chain.dev_keys()
        # the escrow at its computed address, through the deployment proxy (deployed first)
        chain.deploy_local_market(keys[0], deterministic=True)
        from protocol.eth import private_key_address

        me = private_key_address(wallet_key)
        chain.fund(me, native_wei=10**19, token_units=10_000 * 10**chain.decimals(chain.token_address),
                   minter_key=keys[0])
        logging.getLogger("gpumarket").warning(
            "embedded chain: an in-process EVM that only this node can see (for trying things out)")
        return chain
    from .chain import NoContractError
    from .deterministic import escrow_address

    computed = escrow_address()
    escrow = config.chain.escrow or computed
    if escrow != computed:
        logging.getLogger("gpumarket").warning(
            "chain.escrow 0x%s is not this version's escrow address 0x%s (computed from its init "
            "code): offers name 0x%s, and nodes on the computed address will not take them",
            escrow.hex(), computed.hex(), escrow.hex())
    try:
        return Chain.connect(rpc, chain_id=config.chain.chain_id, escrow=escrow,
                             token=config.chain.token)
    except NoContractError as exc:
        if config.chain.escrow is None and "escrow" in str(exc):
            raise UserError(f"no escrow at its computed address 0x{computed.hex()} on {rpc}: "
                            f"deploy it once with `gpumarket escrow deploy --rpc {rpc}` (anyone "
                            "may; it lands at that address on every chain)", "chain") from None
        raise


def cmd_node_run(args: argparse.Namespace) -> int:
    from .config import load_config

    config = load_config(_config_path(args))
    with lock_data_dir(config.data_dir):  # held while this node runs
        return _run_node(args, config)


def _run_node(args: argparse.Namespace, config) -> int:
    import trio

    from .chain import AsyncChain
    from .control import ControlServer
    from .discovery import DiscoveryConfig
    from .fake_nvml import FakeNvml
    from .node import Node, NodeConfig, ProviderSettings
    from .reachability import ReachabilityConfig
    from .wallet import Wallet

    from .config import check_multiaddrs

    check_multiaddrs(args.listen or (), "--listen")
    check_multiaddrs(args.bootstrap or (), "--bootstrap", peer_id=True)
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
                           on_preempt=tuple(shlex.split(args.on_preempt)) if args.on_preempt else None,
                           reachability=ReachabilityConfig(**config.relay),
                           discovery=DiscoveryConfig(**config.discovery)),
                AsyncChain(chain))

    _node_logging(str(node.peer_id), args.debug, config.data_dir)

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
                    await node.withdraw_before_exit()
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)
    _close_leaked_sockets()
    return 0


def _close_leaked_sockets() -> None:
    """py-libp2p 0.8.1 leaves some connections' sockets open when its hosts are cancelled
    (still referenced, so no collection frees them before exit), and the interpreter warns
    about each at exit, past our ResourceWarning filter. The node has stopped: close them."""
    import gc
    import socket

    leaked = [o for o in gc.get_objects() if isinstance(o, socket.socket) and o.fileno() != -1
              and o.family in (socket.AF_INET, socket.AF_INET6)]
    for sock in leaked:
        sock.close()
    if leaked:
        logging.getLogger("gpumarket").debug("closed %d socket(s) py-libp2p left open", len(leaked))


LOCK_NAME = "node.lock"


def lock_data_dir(data_dir: Path):
    """One node per data directory: an exclusive lock on DATA_DIR/node.lock, held by the open
    file (the OS releases it when the process ends, however it ends)."""
    import fcntl

    data_dir.mkdir(parents=True, exist_ok=True)
    f = open(data_dir / LOCK_NAME, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise UserError(f"another node is already running on {data_dir} (pid {pid}): stop it, or "
                        "give this one its own --data-dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


OUR_LOGGERS = ("node", "protocol", "gpumarket")
LOG_NAME = "node.log"


def _node_logging(peer_id: str, debug: bool, data_dir: Path) -> None:
    """A running node logs what it does at INFO, each line tagged with its (short) peer id: to
    the terminal (stderr) and to DATA_DIR/node.log. py-libp2p's own loggers (and any other
    library's) go to node.log only: the ~40 "Failed to open TCP stream" lines of one dead peer
    are the node log's business, not the terminal's. --debug shows everything everywhere."""
    tag = peer_id[-8:]

    class PeerTag(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            record.peer = tag
            return True

    class Ours(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return record.name.split(".", 1)[0] in OUR_LOGGERS

    fmt = logging.Formatter("%(asctime)s %(levelname)-7s peer=%(peer)s %(name)s: %(message)s")
    root = logging.getLogger()
    for handler in root.handlers:
        handler.addFilter(PeerTag())
        handler.setFormatter(fmt)
        if not debug:
            handler.addFilter(Ours())
    file = logging.FileHandler(data_dir / LOG_NAME, encoding="utf-8")
    file.addFilter(PeerTag())
    file.setFormatter(fmt)
    root.addHandler(file)
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)
    # py-libp2p (without LIBP2P_DEBUG) gives its "libp2p" logger no handler and no propagation,
    # so Python's last-resort handler printed its warnings bare on the terminal: route them here.
    lib = logging.getLogger("libp2p")
    lib.handlers.clear()
    lib.propagate = True
    lib.setLevel(logging.DEBUG if debug else logging.WARNING)


# ---------------------------------------------------------------------------------------------
# commands that talk to a running node


def _call(args: argparse.Namespace, op: str, **kw):
    from .control_client import call  # stdlib only: no trio, web3 or libp2p to import

    return call(_data_dir(args), op, **kw)


def _say(args: argparse.Namespace, text: str) -> None:
    """A human line: on stdout, or on stderr under --json (stdout is then JSON only)."""
    print(text, file=sys.stderr if getattr(args, "json", False) else sys.stdout)


def cmd_status(args: argparse.Namespace) -> int:
    doc = _call(args, "status")
    try:
        doc["balance"] = _call(args, "balance")
    except Exception as exc:  # a chain that does not answer must not hide the node's status
        doc["balance"] = {"error": str(exc)}
    if args.json:
        _print_json(doc)
        return 0
    role = "provider" if doc["provider"] else "renter"
    print(f"node:        {doc['name']} ({role}), peer {doc['peer_id']}")
    print(f"wallet:      {doc['wallet']} on chain {doc['chain_id']}, escrow {doc['escrow']}")
    b = doc["balance"]
    if "error" in b:
        print(f"balances:    unavailable ({b['error']})")
    else:
        print(f"balances:    {b['balance']} {b['token']}, {b['native']} {b['native_unit']} for gas, "
              f"{b['locked_in_rentals']} {b['token']} locked in rentals, "
              f"{b['escrow_credits']} {b['token']} escrow credits")
    print(f"peers:       {doc['peers']} connected")
    print(f"offer book:  {doc['offers_in_book']} offers; {doc['rentals']} rentals on this node")
    dialable = doc.get("dialable") or []
    print("dialable:    " + (", ".join(dialable) if dialable else
                             "none (set node.announce to the address other machines dial)"))
    if not doc.get("bootstrap"):
        print("bootstrap:   the list is empty: this node finds no market by itself. Add a peer's "
              "multiaddr to node.bootstrap (or `gpumarket init --network NAME` for a known "
              "network), or pass --bootstrap to `gpumarket node run`")
    return 0


def cmd_balance(args: argparse.Namespace) -> int:
    doc = _call(args, "balance")
    if args.json:
        _print_json(doc)
        return 0
    t = doc["token"]
    print(f"wallet {doc['wallet']} on chain {doc['chain_id']}")
    print(f"  {doc['balance']:>20} {t}  in the wallet")
    print(f"  {doc['locked_in_rentals']:>20} {t}  locked in this node's open rentals (deposits)")
    print(f"  {doc['escrow_credits']:>20} {t}  escrow credits to withdraw")
    print(f"  {doc['native']:>20} {doc['native_unit']}  for gas")
    return 0


def cmd_offers_search(args: argparse.Namespace) -> int:
    from protocol.query import parse_query, parse_sort

    parse_query(args.query)  # a malformed query fails here, with a caret, before any I/O
    if args.sort:
        parse_sort(args.sort)
    if args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1")
    rows = _call(args, "search", query=args.query, sort=args.sort, limit=args.limit)
    if args.json:
        _print_json(rows)
        return 0
    from rich.table import Table

    table = Table(title=f"offers matching {args.query!r}" if args.query else "offers")
    for col in ("offer", "GPUs", "model", "VRAM", "CUDA", "region", "price/GPU-h", "hours",
                "score", "tier", "provider", "images", "interruptible"):
        table.add_column(col)
    for r in rows:
        spot = ", ".join(f"{c['gpus']}x at {c['price_per_gpu_hour']}, {c['notice_s']} s notice"
                         for c in r.get("interruptible", []))
        table.add_row(r["offer_id"], f"{r['gpus']}x {r['model']}", r["model_token"],
                      f"{r['vram_gib']} GiB", r["cuda"], r["region"],
                      f"{r['price_per_gpu_hour']} {r['token']}",
                      f"{_hours(r['min_duration_s'])}-{_hours(r['max_duration_s'])}",
                      f"{r['score']:.2f}", r["tier"], r["provider"],
                      " ".join(r.get("images", [])), spot)
    _console().print(table)
    if not rows:
        print("no offers match; try a broader query, or wait for offers to arrive")
    return 0


def _hours(seconds: int) -> str:
    """Seconds as hours for a person: 600 -> "0.17", 7200 -> "2", 45 -> "0.0125"."""
    h = Decimal(seconds) / 3600
    text = f"{h:.2f}" if h >= Decimal("0.01") else f"{h:.4f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _seconds(args: argparse.Namespace) -> int:
    """The rental length in seconds, from --hours or --seconds; positive, or a usage error."""
    if args.seconds is not None:
        if args.seconds <= 0:
            raise UserError(f"--seconds {args.seconds}: a rental lasts at least one second")
        return args.seconds
    try:
        hours = Decimal(args.hours)
    except (InvalidOperation, TypeError):
        raise UserError(f"--hours {args.hours!r} is not a number (e.g. 2 or 0.5)") from None
    if not hours.is_finite() or hours <= 0:
        raise UserError(f"--hours {args.hours}: must be more than 0")
    seconds = int(hours * 3600)
    if seconds < 1:
        raise UserError(f"--hours {args.hours} is less than a second")
    return seconds


def _check_rent_args(args: argparse.Namespace) -> int:
    """What can be checked before asking the node anything: returns the seconds."""
    seconds = _seconds(args)
    if args.gpus < 1:
        raise UserError(f"--gpus {args.gpus}: rent at least 1 GPU")
    if args.max_price is not None:
        try:
            price = Decimal(args.max_price)
        except InvalidOperation:
            raise UserError(f"--max-price {args.max_price!r} is not a number: the highest price per "
                            "GPU-hour you accept, in token units (e.g. 0.60)") from None
        if not price.is_finite() or price <= 0:
            raise UserError(f"--max-price {args.max_price}: must be more than 0 (per GPU-hour)")
    return seconds


def _check_against_offer(args: argparse.Namespace, seconds: int, offer: dict,
                         price: str | None = None, free_gpus: int | None = None) -> None:
    """The offer's limits, in the person's units, before anything is signed or sent (`price`
    and `free_gpus`: the interruptible set's when renting one)."""
    price = offer["price_per_gpu_hour"] if price is None else price
    free = offer["gpus"] if free_gpus is None else free_gpus
    lo, hi = offer["min_duration_s"], offer["max_duration_s"]
    if not lo <= seconds <= hi:
        asked = f"--hours {args.hours}" if args.hours is not None else f"--seconds {args.seconds}"
        raise UserError(f"{asked} is outside this offer's rental length of {_hours(lo)} to "
                        f"{_hours(hi)} hours ({lo} to {hi} s)")
    if args.gpus > free:
        raise UserError(f"--gpus {args.gpus}: offer {offer['offer_id']} has {free} "
                        f"GPU{'s' if free != 1 else ''} free")
    if args.max_price is not None and Decimal(args.max_price) < Decimal(price):
        raise UserError(f"--max-price {args.max_price} {offer['token']} per GPU-hour is below this "
                        f"offer's price of {price} {offer['token']} per GPU-hour")


def cmd_rent(args: argparse.Namespace) -> int:
    seconds = _check_rent_args(args)
    quote = _call(args, "quote", offer_id=args.offer_id, seconds=seconds, gpu_count=args.gpus,
                  notice_s=args.interruptible or 0)
    o = quote["offer"]
    spot = [c for c in o.get("interruptible", []) if c["notice_s"] == args.interruptible]
    price = spot[0]["price_per_gpu_hour"] if spot else o["price_per_gpu_hour"]
    kind = f"interruptible ({args.interruptible} s notice) " if spot else ""
    _check_against_offer(args, seconds, o, price, spot[0]["gpus"] if spot else None)
    _say(args, f"renting {args.gpus}x {kind}{o['model']} from {o['provider']} for {_hours(seconds)} "
               f"hours ({seconds} s) at {price} {o['token']} per GPU-hour")
    _say(args, f"this locks up to {quote['deposit_tokens']} {quote['token']} in the escrow "
               "contract; unused time is refunded")
    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("confirmation needed: pass --yes to rent without a prompt")
        if input("proceed? [y/N] ").strip().lower() not in ("y", "yes"):
            _say(args, "not rented")
            raise UserError("not rented: not confirmed", "refused")
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
        print(f"rented: agreement {row['agreement_id'][:16]}, deposit {row['deposit_tokens']} "
              f"{row['token']} locked; `gpumarket rentals` shows its progress")
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
    if args.watch is not None:
        if args.json:
            raise UserError("--watch draws a live table; use --json without it")
        if args.watch <= 0:
            raise UserError(f"--watch {args.watch}: the refresh interval must be positive (seconds)")
        return _watch_rentals(args)
    rows = _call(args, "rentals", all=args.all)
    if args.json:
        _print_json(rows)
        return 0
    _console().print(_rentals_table(rows, args.all))
    if not rows:
        print("no rentals on this node" + ("" if args.all else " since it started (--all: history)"))
    return 0


def _watch_rentals(args: argparse.Namespace) -> int:
    """The rentals table, redrawn every --watch seconds until Ctrl-C."""
    import time

    from rich.live import Live

    try:
        with Live(_rentals_table(_call(args, "rentals", all=args.all), args.all),
                  console=_console(), auto_refresh=False) as live:
            while True:
                time.sleep(args.watch)
                live.update(_rentals_table(_call(args, "rentals", all=args.all), args.all),
                            refresh=True)
    except KeyboardInterrupt:
        return 0


def _rentals_table(rows: list, history: bool):
    from rich.table import Table

    table = Table(title="rentals (all recorded)" if history else "rentals")
    for col in ("agreement", "role", "state", "GPUs", "elapsed", "acked", "price/GPU-h",
                "deposit", "cost so far", "heartbeats", "notice"):
        table.add_column(col)
    for r in rows:
        t = r["token"]
        n = r.get("notice")
        notice = "" if n is None else f"stops in {n['time_left_s']} s ({n['detail'] or n['reason']})"
        table.add_row(r["agreement_id"][:16], r["role"], r["state"], str(r["gpus"]),
                      f"{r['elapsed_s']}/{r['max_seconds']} s", f"{r['acked_seconds']} s",
                      f"{r['price_per_gpu_hour']} {t}", f"{r['deposit_tokens']} {t}",
                      f"{r['cost_so_far_tokens']} {t}", str(r["heartbeats"]), notice)
    return table


def cmd_rental_stop(args: argparse.Namespace) -> int:
    row = _call(args, "stop", agreement_id=args.agreement_id)
    if args.json:
        _print_json(row)
        return 0
    print(f"stopping {row['agreement_id'][:16]}: the escrow is closed; the provider claims "
          f"{row['cost_so_far_tokens']} {row['token']} for the {row['acked_seconds']} s acknowledged "
          "and the rest of the deposit comes back to you")
    return 0


def cmd_evidence_export(args: argparse.Namespace) -> int:
    doc = _call(args, "evidence", agreement_id=args.agreement_id)
    out = Path(args.output or f"evidence-{doc['agreement_id'][:16]}.bin")
    if out.is_dir():
        raise UserError(f"{out} is a directory: give a file name with -o")
    out.write_bytes(bytes.fromhex(doc["bundle"]))
    result = {"file": str(out), "agreement_id": doc["agreement_id"],
              "heartbeats": doc["heartbeats"], "receipts": doc["receipts"]}
    if args.json:
        _print_json(result)
        return 0
    print(f"wrote {out}: {doc['heartbeats']} heartbeats, {doc['receipts']} receipts; "
          f"check it with `gpumarket evidence verify {out}`")
    return 0


def cmd_evidence_verify(args: argparse.Namespace) -> int:
    from protocol.encoding import decode
    from protocol.errors import DecodeError
    from protocol.evidence import verify_bundle
    from protocol.messages import EvidenceBundle

    path = Path(args.file)
    if path.is_dir():
        raise UserError(f"{path} is a directory, not an evidence bundle file")
    try:
        bundle = decode(path.read_bytes(), EvidenceBundle)
    except FileNotFoundError:
        raise UserError(f"no such file: {path}", "not_found") from None
    except DecodeError as exc:
        raise UserError(f"{path} is not an evidence bundle: {exc}", "refused") from None
    verdict = verify_bundle(bundle)
    doc = verdict.to_json_dict()
    valid = not doc.get("invalid")
    doc = {"valid": valid, **doc}
    if verdict.terms_valid:  # what an arbiter awards on a disputed claim (specs/evidence.md)
        from protocol.evidence import arbiter_ruling

        doc["arbiter_ruling"] = arbiter_ruling(bundle).to_json_dict()
    if args.json:
        _print_json(doc)
    else:
        print("VALID" if valid else "INVALID")
        for key, value in doc.items():
            if key not in ("valid", "invalid"):
                print(f"{key:>24}: {value}")
        for f in doc.get("invalid") or []:
            where = f"{f['kind']} #{f['index']}" if f["index"] >= 0 else f["kind"]
            print(f"  failed: {where}: {f['detail'] or f['code']} ({f['code']})")
    return 0 if valid else EXIT_REFUSED


def _escrow_op(args: argparse.Namespace, op: str, human: Callable[[dict], str]) -> int:
    """The node's answer to control op `op` on args.agreement_id: JSON under --json, else the
    text human(doc)."""
    doc = _call(args, op, agreement_id=args.agreement_id)
    if args.json:
        _print_json(doc)
    else:
        print(human(doc))
    return 0


def cmd_escrow_status(args: argparse.Namespace) -> int:
    def human(doc: dict) -> str:
        t = doc["token"]
        return (f"agreement {doc['agreement_id'][:16]}: {doc['state']}, deposit {doc['deposit_tokens']} {t}\n"
                f"  acknowledged: {doc['acked_seconds']} s -> {doc['to_provider_tokens']} {t} to the "
                f"provider, {doc['to_renter_tokens']} {t} back to the renter")

    return _escrow_op(args, "escrow_status", human)


def cmd_escrow_claim(args: argparse.Namespace) -> int:
    return _escrow_op(args, "escrow_claim", lambda doc: (
        f"claimed {doc['acked_seconds']} s: {doc['paid_tokens']} {doc['token']} paid (tx {doc['tx']})"))


def cmd_escrow_recover(args: argparse.Namespace) -> int:
    return _escrow_op(args, "escrow_recover", lambda doc: (
        f"recovered: {doc['refunded_tokens']} {doc['token']} back to the renter (tx {doc['tx']})"))


def cmd_escrow_deploy(args: argparse.Namespace) -> int:
    """Deploy the escrow at its computed address where it is missing (idempotent)."""
    from .chain import Chain
    from .deterministic import deploy_escrow, escrow_address

    key = _deployer_key(args)
    chain = Chain.connect(args.rpc)
    d = deploy_escrow(chain, key)
    doc = {"escrow": "0x" + d.address.hex(), "chain_id": chain.chain_id, "deployed": d.deployed,
           "gas_used": d.gas_used, "proxy_deployed": d.proxy_deployed}
    assert d.address == escrow_address()
    if args.json:
        _print_json(doc)
    elif d.deployed:
        print(f"deployed the escrow at 0x{d.address.hex()} on chain {chain.chain_id}: "
              f"{d.gas_used} gas" + (" (and the deployment proxy first)" if d.proxy_deployed else ""))
    else:
        print(f"the escrow is already at 0x{d.address.hex()} on chain {chain.chain_id}: nothing sent")
    return 0


def cmd_escrow_address(args: argparse.Namespace) -> int:
    from .deterministic import ESCROW_SALT, PROXY_ADDRESS, escrow_address

    doc = {"escrow": "0x" + escrow_address().hex(), "proxy": "0x" + PROXY_ADDRESS.hex(),
           "salt": "0x" + ESCROW_SALT.hex()}
    print(json.dumps(doc) if args.json else doc["escrow"])
    return 0


def _deployer_key(args: argparse.Namespace) -> bytes:
    """The key that pays for a deployment: --key-file (hex), else this node's wallet keystore."""
    if args.key_file:
        try:
            return bytes.fromhex(Path(args.key_file).read_text().strip().removeprefix("0x"))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read a hex private key from {args.key_file}: {exc}") from None
    from .config import load_config
    from .wallet import Wallet

    config = load_config(_config_path(args))
    return Wallet.from_keystore(config.keystore_path, _password()).key


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


def cmd_devnet_faucet(args: argparse.Namespace) -> int:
    from .config import parse_address
    from .devnet import faucet

    address = parse_address(args.address, "ADDRESS")  # ConfigError: a usage error (exit 2)
    if args.eth < 0 or args.tokens < 0:
        raise UserError("--eth and --tokens must not be negative")
    try:
        doc = faucet(Path(args.dir), address, args.eth, args.tokens)
    except FileNotFoundError as exc:
        raise UserError(str(exc), "not_found") from None
    if args.json:
        _print_json(doc)
    else:
        print(f"funded {doc['address']}: {args.eth} ETH and {args.tokens} tUSDC "
              f"(tUSDC balance now {doc['tUSDC_balance']:g})")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    result = run_demo(_console())
    return 0 if result.ok else EXIT_ERROR


# ---------------------------------------------------------------------------------------------


class _VersionAction(argparse.Action):
    """--version, read from the installed metadata only when asked (importlib.metadata is slow)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"gpumarket {_version()}")
        parser.exit()


def build_parser(plugins: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpumarket", description="A decentralized peer-to-peer GPU rental market.",
        epilog="exit codes: 0 ok, 1 refused, 2 usage or configuration, 3 not found (no node "
               "running, no such offer, rental or file), 4 chain error, 5 internal error")
    parser.add_argument("--version", action=_VersionAction, nargs=0, help="print the version and exit")
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

    p = sub.add_parser("devnet", help="start anvil and N node processes for experiments",
                       description="Starts anvil (the binary in $GPUMARKET_ANVIL, else the one "
                                   "`npm install --prefix .anvil` put in the repository) and N "
                                   "node processes; prints their dialable multiaddrs and the "
                                   "export lines to use them.")
    p.add_argument("--providers", type=int, default=3)
    p.add_argument("--renters", type=int, default=1)
    p.add_argument("--dir", default="./devnet", help="where the nodes' data directories go")
    p.set_defaults(func=cmd_devnet)
    dsub = p.add_subparsers(dest="devnet_command", metavar="SUBCOMMAND")
    s = dsub.add_parser("faucet", help="fund a wallet on the running devnet (10 ETH, 1000 tUSDC)")
    s.add_argument("address", help="0x-prefixed wallet address")
    s.add_argument("--dir", default=argparse.SUPPRESS, help="the running devnet's directory (default ./devnet)")
    s.add_argument("--eth", type=int, default=10)
    s.add_argument("--tokens", type=int, default=1000, help="tUSDC to mint")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_devnet_faucet)

    p = sub.add_parser("init", help="create the node's identity, encrypted wallet and config")
    p.add_argument("--provider", action="store_true", help="enable the provider role in the config")
    p.add_argument("--import-key-file", help="import a hex private key from this file (into the keystore)")
    p.add_argument("--network", help="fill [chain] and the bootstrap list for a known network "
                                     "(local, base-sepolia, arbitrum-sepolia, sepolia, base)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("balance", help="the wallet's balances in token units (and what rentals lock)")
    p.add_argument("--json", action="store_true", help=JSON_HELP)
    p.set_defaults(func=cmd_balance)

    p = sub.add_parser("gpus", help="what the NVML probe sees on this machine")
    p.add_argument("--fake", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=JSON_HELP)
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
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_offers_publish)
    s = osub.add_parser("withdraw", help="(provider) withdraw the offer")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
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
    p.add_argument("--all", action="store_true", help="every agreement in the store (history), "
                                                      "not only this run's")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="redraw the table every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_rentals)

    p = sub.add_parser("rental", help="act on one rental")
    rsub = p.add_subparsers(dest="rental_command", metavar="SUBCOMMAND", required=True)
    s = rsub.add_parser("stop", help="end a rental early and settle")
    s.add_argument("agreement_id")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
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
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_evidence_export)
    s = esub.add_parser("verify", help="check a bundle offline and print the verdict")
    s.add_argument("file")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_evidence_verify)

    p = sub.add_parser("escrow", help="the on-chain side of an agreement")
    xsub = p.add_subparsers(dest="escrow_command", metavar="SUBCOMMAND", required=True)
    s = xsub.add_parser("status", help="the escrow's state for an agreement")
    s.add_argument("agreement_id")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_escrow_status)
    s = xsub.add_parser("deploy", help="deploy the escrow at its computed address on a chain "
                                       "(idempotent; prints the address and the gas)")
    s.add_argument("--rpc", required=True, help="the chain's JSON-RPC URL")
    s.add_argument("--key-file", help="hex private key that pays the gas (default: this node's wallet)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_escrow_deploy)
    s = xsub.add_parser("address", help="the escrow's address, computed from its init code (no I/O)")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_escrow_address)
    s = xsub.add_parser("claim", help="(provider) claim now with the latest stored receipt")
    s.add_argument("agreement_id")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_escrow_claim)
    s = xsub.add_parser("recover", help="return the deposit to the renter after end + grace, unclaimed")
    s.add_argument("agreement_id")
    s.add_argument("--json", action="store_true", help=JSON_HELP)
    s.set_defaults(func=cmd_escrow_recover)

    if plugins:
        _register_plugin_commands(sub)
    return parser


def _builtin_command(argv: list[str]) -> bool:
    """Whether argv names one of this module's commands: then no plugin is loaded (loading the
    simulator's entry point alone costs a third of a second that `gpumarket status` need not pay)."""
    # options that take a value come before the command: skip their values
    i, first = 0, None
    while i < len(argv):
        a = argv[i]
        if a in ("--data-dir", "--config"):
            i += 2
            continue
        if not a.startswith("-"):
            first = a
            break
        i += 1
    return first in BUILTIN_COMMANDS


# Commands that other packages add (the simulator's `gpumarket simulate`): each entry point in
# this group names a `register(subparsers)` function. The node never imports those packages
# itself, so a provider's node runs without the simulator's numpy, numba and matplotlib.
PLUGIN_GROUP = "gpumarket.commands"
JSON_HELP = "print JSON only on stdout (errors too, as {\"ok\": false, \"error\", \"kind\", \"exit\"})"
BUILTIN_COMMANDS = frozenset({"demo", "devnet", "init", "node", "status", "gpus", "offers", "rent",
                              "rentals", "rental", "evidence", "escrow", "balance"})


def _register_plugin_commands(sub) -> None:
    from importlib.metadata import entry_points

    for ep in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name):
        try:
            register = ep.load()
        except ImportError as exc:  # a broken optional package must not take the node's CLI down
            logging.getLogger(__name__).warning("command %r not available: %s", ep.name, exc)
            continue
        register(sub)


def _join_dash_values(argv: list[str]) -> list[str]:
    """`--sort -price` as `--sort=-price`: argparse takes a value that starts with '-' for an
    option of its own, and the help promises `-price`."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--sort" and i + 1 < len(argv) and argv[i + 1].startswith("-"):
            out.append(f"--sort={argv[i + 1]}")
            i += 2
            continue
        out.append(argv[i])
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _join_dash_values(sys.argv[1:] if argv is None else list(argv))
    parser = build_parser(plugins=not _builtin_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.debug:
        # py-libp2p leaves sockets to the garbage collector when its hosts are cancelled.
        warnings.filterwarnings("ignore", category=ResourceWarning)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as raised:
        if args.debug:
            raise
        message, kind = _describe(_one_cause(raised))
        code = EXIT_CODES[kind]
        if getattr(args, "json", False):  # stdout stays JSON: the error as a document too
            print(json.dumps({"ok": False, "error": message, "kind": kind, "exit": code}))
        print(f"gpumarket: {message}", file=sys.stderr)
        return code


def _describe(exc: BaseException) -> tuple[str, str]:
    """(one line, kind) for an error a command raised; kind is an EXIT_CODES key."""
    if _is(exc, "node.gpu", "NoGpuError"):
        return (f"no GPU to offer: {exc}. A provider needs an NVIDIA GPU and its driver; to rent "
                "only, set [provider] enabled = false"), "usage"
    if _is(exc, "protocol.query", "QueryError"):
        return exc.detail, "usage"
    if isinstance(exc, UserError):
        return str(exc), exc.kind
    if any(_is(exc, m, n) for m, n in (("node.config", "ConfigError"),
                                       ("node.addresses", "NoDialableAddress"),
                                       ("node.host", "ListenError"))):
        return str(exc), "usage"
    if _is(exc, "node.control_client", "ControlError"):
        return str(exc), exc.kind if exc.kind in EXIT_CODES else "refused"
    if _is(exc, "node.chain", "ChainError"):
        return str(exc), "chain"
    if _is(exc, "node.wallet", "WalletError") or _is(exc, "protocol.errors", "ProtocolError"):
        return str(exc), "refused"
    return f"unexpected {type(exc).__name__}: {exc} (run with --debug for details)", "internal"


def _is(exc: BaseException, module: str, name: str) -> bool:
    """isinstance(exc, module.name) without importing the module: a command that never loaded
    it cannot have raised its errors (the CLI stays fast, see _lazy imports)."""
    mod = sys.modules.get(module)
    cls = getattr(mod, name, None) if mod is not None else None
    return cls is not None and isinstance(exc, cls)


def _one_cause(exc: BaseException) -> BaseException:
    """The one error inside trio's nested exception groups (a node's task failed and the rest
    were cancelled), so that it is reported as itself; the group when there are several."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if type(e).__name__ != "Cancelled"]
        if len(inner) != 1:
            return exc
        exc = inner[0]
    return exc


if __name__ == "__main__":
    sys.exit(main())
