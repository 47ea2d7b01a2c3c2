"""`gpumarket demo`: a complete market on this machine, with nothing but the installed package.

An in-process EVM (py-evm) runs the real escrow contract and a test stablecoin; three provider
nodes with simulated GPUs (a fake NVML: these machines have no GPU) and one renter node run as
real libp2p hosts on 127.0.0.1. The renter finds the offers by gossip, searches, negotiates,
opens two escrows and rents; one provider is killed mid-rental on purpose and the renter gets its
deposit back, the other rental runs to its end and settles on the renter's receipts. Every step
is checked, and the balances before and after must add up exactly; any missing step exits
non-zero.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import trio
from rich.console import Console
from rich.table import Table

from protocol.params import Params
from protocol.settlement import claim_payout

from .chain import AsyncChain, Chain
from .fake_nvml import FakeGpu, FakeNvml
from .node import Node, NodeConfig, ProviderSettings, RentError
from .testing import recover_past_grace

USDC_DECIMALS = 6  # the demo deploys its own tUSDC, with these decimals
USDC = 10**USDC_DECIMALS
# Fast protocol timing so a whole rental fits in seconds (the defaults are 30 s heartbeats).
DEMO_PARAMS = Params(
    clock_skew_ms=2_000, min_heartbeat_interval_s=1, heartbeat_late_tolerance_ms=500,
    negotiation_step_timeout_ms=5_000, renter_heartbeat_timeout_intervals=2,
    provider_stop_after_missed_receipts=3,
)


@dataclass(frozen=True)
class DemoProvider:
    name: str
    model: str
    vram_mib: int
    cc: tuple[int, int]
    gpus: int
    usd_per_hour: str
    region: str


# 2026 prices (shared/data/gpu_market_prices_2026.csv): RTX 4090 $0.29-0.80, RTX 3090 $0.35-0.55,
# A100 80GB $1.39-2.40 per GPU-hour.
PROVIDERS = (
    DemoProvider("provider-a", "NVIDIA GeForce RTX 4090", 24564, (8, 9), 2, "0.45", "eu-frankfurt"),
    DemoProvider("provider-b", "NVIDIA GeForce RTX 3090", 24576, (8, 6), 1, "0.38", "us-dallas"),
    DemoProvider("provider-c", "NVIDIA A100-SXM4-80GB", 81920, (8, 0), 1, "1.60", "jp-tokyo"),
)


class DemoFailure(Exception):
    """A step of the demo did not happen."""


@dataclass
class Step:
    name: str
    ok: bool = False
    detail: str = ""


@dataclass
class DemoResult:
    steps: list[Step] = field(default_factory=list)
    balances: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (before, after)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)


def fake_gpus(p: DemoProvider) -> FakeNvml:
    gpus = [FakeGpu(name=p.model, uuid=f"GPU-{p.name}-{i:04d}-demo", memory_total_mib=p.vram_mib,
                    compute_capability=p.cc, utilization_pct=97, temperature_c=66, power_mw=310_000)
            for i in range(p.gpus)]
    return FakeNvml(gpus)


def fmt_usdc(units: int) -> str:
    return f"{Decimal(units) / USDC:,.6f}"


class Demo:
    def __init__(self, console: Console, workdir: Path) -> None:
        self.console = console
        self.workdir = workdir
        self.result = DemoResult()

    def step(self, name: str, ok: bool, detail: str = "") -> None:
        self.result.steps.append(Step(name, ok, detail))
        mark = "[green]ok[/green]" if ok else "[red]FAILED[/red]"
        self.console.print(f"  {mark}  {name}" + (f" [dim]- {detail}[/dim]" if detail else ""))
        if not ok:
            raise DemoFailure(f"{name}: {detail}")

    async def run(self) -> DemoResult:
        t0 = time.monotonic()
        c = self.console
        c.rule("[bold]gpumarket demo[/bold]: a local market on an embedded EVM")
        chain = Chain.embedded()
        dev_keys = chain.dev_keys()
        deployer = dev_keys[0]
        escrow, token = chain.deploy_local_market(deployer, symbol="tUSDC", decimals=USDC_DECIMALS)
        self.step("escrow contract and test stablecoin deployed",
                  True, f"chain {chain.chain_id}, escrow 0x{escrow.hex()[:10]}..., tUSDC 0x{token.hex()[:10]}...")
        wallets = {p.name: dev_keys[i + 1] for i, p in enumerate(PROVIDERS)}
        wallets["renter"] = dev_keys[len(PROVIDERS) + 1]
        # dev accounts hold native coin for gas; the renter also needs stablecoins to rent with
        chain.fund(_addr(wallets["renter"]), token_units=1_000 * USDC, minter_key=deployer)
        addresses = {name: _addr(key) for name, key in wallets.items()}
        addresses["escrow contract"] = escrow
        before = {name: chain.token_balance(a) for name, a in addresses.items()}
        await trio.sleep(chain.lead_s())  # let the wall clock catch up with block time
        achain = AsyncChain(chain)

        async with trio.open_nursery() as nursery:
            nodes: dict[str, Node] = {}
            scopes: dict[str, trio.CancelScope] = {}

            async def start_node(name: str, provider: ProviderSettings | None,
                                 bootstrap: tuple[str, ...] = ()) -> Node:
                node = Node(NodeConfig(data_dir=self.workdir / name, wallet_key=wallets[name],
                                       bootstrap=bootstrap, params=DEMO_PARAMS, provider=provider,
                                       name=name, chain_poll_s=0.3), achain)
                scope = trio.CancelScope()
                scopes[name] = scope

                async def run(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    with scope:
                        await node.run(task_status=task_status)

                await nursery.start(run)
                nodes[name] = node
                return node

            first = None
            for p in PROVIDERS:
                settings = ProviderSettings(
                    price_per_gpu_hour=Decimal(p.usd_per_hour),
                    min_duration_s=5, max_duration_s=3600, heartbeat_interval_s=1,
                    grace_s=DEMO_PARAMS.min_grace_s,  # the escrow's minimum: 5 minutes
                    region=p.region, offer_lifetime_ms=10 * 60 * 1000, publish_interval_s=0.2,
                    nvml=fake_gpus(p),
                )
                node = await start_node(p.name, settings, (first,) if first else ())
                first = first or node.addrs()[0]
            renter = await start_node("renter", None, (first,))
            await _connect_all(list(nodes.values()))
            self.step("4 nodes up on 127.0.0.1 (3 providers, 1 renter)", True,
                      ", ".join(f"{n}={str(node.peer_id)[-8:]}" for n, node in nodes.items()))

            # -- offers arrive by gossip (and sync) ---------------------------------------------
            with trio.move_on_after(15):
                while len(renter.book) < len(PROVIDERS):
                    await renter.offers.sync()
                    await trio.sleep(0.2)
            self.step("renter's offer book holds every provider's offer",
                      len(renter.book) == len(PROVIDERS), f"{len(renter.book)} offers")
            self._offers_table(renter, "Offers on the market")

            # -- search ---------------------------------------------------------------------------
            query, sort = "gpu=RTX_4090,RTX_3090 price<=0.50 vram>=24", "price"
            hits = renter.search(query, sort)
            c.print(f"  search: [bold]{query}[/bold] --sort {sort}")
            self.step("search finds the two consumer GPUs under $0.50/h, cheapest first",
                      [h.offer.gpus[0].model for h in hits] ==
                      ["NVIDIA GeForce RTX 3090", "NVIDIA GeForce RTX 4090"],
                      ", ".join(f"{h.offer_id} {h.price_per_gpu_hour_tokens():.2f}/h" for h in hits))
            cheap, fast = hits[0], hits[1]

            # -- negotiate and open two escrows ------------------------------------------------
            try:
                doomed = await renter.rent([cheap], gpu_count=1, duration_s=20,
                                           max_price_per_gpu_second=cheap.offer.terms.price_per_gpu_second,
                                           access_key="ssh-ed25519 AAAAC3Nza demo@renter")
                healthy = await renter.rent([fast], gpu_count=1, duration_s=8,
                                            max_price_per_gpu_second=fast.offer.terms.price_per_gpu_second,
                                            access_key="ssh-ed25519 AAAAC3Nza demo@renter")
            except RentError as exc:
                self.step("negotiations reach agreements", False, str(exc))
                raise
            for r, who in ((doomed, "provider-b"), (healthy, "provider-a")):
                self.step(f"agreement with {who} negotiated and escrow opened", r.opened is not None,
                          f"id {r.agreement_id.hex()[:12]}, {fmt_usdc(r.terms.deposit)} tUSDC locked "
                          f"for {r.terms.max_seconds} s, open cost {r.opened.gas_used:,} gas")

            # -- heartbeats and receipts ------------------------------------------------------------
            with trio.move_on_after(10):
                while doomed.session.log.receipts < 3 or healthy.session.log.receipts < 3:
                    await trio.sleep(0.1)
            self.step("heartbeats answered by signed receipts on both rentals",
                      doomed.session.log.receipts >= 3 and healthy.session.log.receipts >= 3,
                      f"receipts so far: {doomed.session.log.receipts} and "
                      f"{healthy.session.log.receipts}, acked {doomed.session.machine.acked_seconds} s "
                      f"and {healthy.session.machine.acked_seconds} s")

            # -- provider-b fails ---------------------------------------------------------------
            acked_before_failure = doomed.session.machine.acked_seconds
            scopes["provider-b"].cancel()
            c.print("  [yellow]provider-b's node is killed mid-rental[/yellow]")

            # -- both rentals end -------------------------------------------------------------
            aid_doomed, aid_healthy = doomed.agreement_id, healthy.agreement_id
            with trio.move_on_after(45):
                while not (await achain.run(chain.status, aid_doomed)).state == "closed" \
                        or (await achain.run(chain.status, aid_healthy)).state != "final":
                    await trio.sleep(0.2)
            # The deposit of the closed escrow is recoverable once the grace (at least 5 minutes:
            # the provider's time to claim) has passed: fast-forward the local chain's clock
            # past it, and recover with the renter's wallet, as its node would at that time.
            if (await achain.run(chain.status, aid_doomed)).state == "closed":
                skipped = await achain.run(recover_past_grace, chain, wallets["renter"], doomed.terms)
                c.print(f"  [yellow]local chain clock fast-forwarded {skipped} s past the grace[/yellow]")
            doomed_events = [e.name for e in await achain.run(chain.events) if e.agreement_id == aid_doomed]
            healthy_events = [e for e in await achain.run(chain.events) if e.agreement_id == aid_healthy]
            self.step("renter stopped paying provider-b, closed the escrow and recovered its deposit",
                      doomed_events[:3] == ["Opened", "Closed", "Recovered"],
                      f"events {doomed_events}; {acked_before_failure} s had been acknowledged, "
                      f"forfeited by a provider that never claimed")
            claimed = [e for e in healthy_events if e.name == "Claimed"]
            self.step("provider-a claimed on the renter's last receipt and the escrow settled",
                      bool(claimed) and claimed[0].args["acked_seconds"] > 0,
                      f"acked {claimed[0].args['acked_seconds'] if claimed else 0} of "
                      f"{healthy.terms.max_seconds} s")
            # -- local reputation ------------------------------------------------------------------
            with trio.move_on_after(10):
                while len(renter.reputation.outcomes) < 2:
                    await trio.sleep(0.1)
            outcomes = {o.agreement_id: o for o in renter.reputation.outcomes}
            self._reputation_table(renter)
            judged = outcomes.get(healthy.agreement_id)
            self.step("the renter's verdict from its own evidence matches what the escrow paid",
                      len(outcomes) == 2 and judged is not None
                      and judged.acked_seconds == claimed[0].args["acked_seconds"],
                      "scores are weighted by hours of history, so seconds-long rentals move them "
                      "little from the 0.5 given to unknown providers")
            nursery.cancel_scope.cancel()

        # -- balances -----------------------------------------------------------------------------
        after = {name: chain.token_balance(a) for name, a in addresses.items()}
        self.result.balances = {n: (before[n], after[n]) for n in before}
        acked = claimed[0].args["acked_seconds"]
        pay = claim_payout(healthy.terms, acked)
        expected = {n: 0 for n in before}
        expected["provider-a"] = pay.provider
        expected["renter"] = -pay.provider
        self._balances_table(before, after, expected)
        self.step("every balance changed by exactly the settlement math, and the totals match",
                  all(after[n] - before[n] == expected[n] for n in before)
                  and sum(after.values()) == sum(before.values()),
                  f"total {fmt_usdc(sum(before.values()))} tUSDC before and after")
        c.print(f"[bold green]demo complete[/bold green] in {time.monotonic() - t0:.1f} s")
        return self.result

    def _offers_table(self, node: Node, title: str) -> None:
        table = Table(title=title)
        for col in ("offer", "GPUs", "VRAM", "region", "$/GPU-hour", "provider"):
            table.add_column(col)
        for e in node.book.query("", "price"):
            o = e.offer
            table.add_row(e.offer_id, f"{len(o.gpus)}x {o.gpus[0].model}",
                          f"{o.gpus[0].vram_mib / 1024:.0f} GiB", o.host.region,
                          f"{e.price_per_gpu_hour_tokens():.4f}", str(o.provider.hex()[:8]))
        self.console.print(table)

    def _reputation_table(self, node: Node) -> None:
        table = Table(title="renter's local reputation (from its own evidence)")
        for col in ("provider", "agreements", "paid s", "acknowledged s", "delivered", "score"):
            table.add_column(col)
        for s in node.reputation.table():
            table.add_row(s.provider_key.hex()[:8], str(s.agreements), f"{s.paid_hours * 3600:.0f}",
                          f"{s.delivered_hours * 3600:.0f}",
                          f"{s.delivered_hours / s.paid_hours:.0%}" if s.paid_hours else "-",
                          f"{s.score:.3f}")
        self.console.print(table)

    def _balances_table(self, before: dict[str, int], after: dict[str, int],
                        expected: dict[str, int]) -> None:
        table = Table(title="tUSDC balances")
        for col in ("account", "before", "after", "change", "expected change"):
            table.add_column(col, justify="right" if col != "account" else "left")
        for n in before:
            table.add_row(n, fmt_usdc(before[n]), fmt_usdc(after[n]),
                          fmt_usdc(after[n] - before[n]), fmt_usdc(expected[n]))
        table.add_row("total", fmt_usdc(sum(before.values())), fmt_usdc(sum(after.values())),
                      fmt_usdc(sum(after.values()) - sum(before.values())), fmt_usdc(0))
        self.console.print(table)


def _addr(key: bytes) -> bytes:
    from protocol.eth import private_key_address

    return private_key_address(key)


async def _connect_all(nodes: list[Node]) -> None:
    async with trio.open_nursery() as nursery:
        for i, a in enumerate(nodes):
            for b in nodes[i + 1:]:
                nursery.start_soon(_try_connect, a, b)


async def _try_connect(a: Node, b: Node) -> None:
    try:
        await a.host.connect(b.addrs()[0])
    except Exception as exc:  # gossip still reaches it through the others
        logging.getLogger(__name__).info("connect %s -> %s failed: %r", a.config.name, b.config.name, exc)


def run_demo(console: Console | None = None, workdir: Path | None = None) -> DemoResult:
    console = console or Console()
    tmp = None
    if workdir is None:
        tmp = Path(tempfile.mkdtemp(prefix="gpumarket-demo-"))
        workdir = tmp
    demo = Demo(console, workdir)
    try:
        return trio.run(demo.run)
    except DemoFailure as exc:
        console.print(f"[bold red]demo failed[/bold red]: {exc}")
        return demo.result
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
