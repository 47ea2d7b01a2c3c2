"""Interruptible capacity end to end (issue 18): two nodes on loopback and the embedded EVM running
the real escrow; a power price feed served by the test over HTTP on 127.0.0.1 crosses the
provider's curtailment threshold mid-rental. The renter gets the notice (and runs its
--on-preempt command), is charged exactly the acknowledged seconds with the rest paid back at
once, and the interruptible GPU comes back in the offer when the price falls."""

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import trio

from node.anvil import AnvilProcess, find_anvil
from node.chain import AsyncChain, Chain
from node.control import ControlServer
from node.demo import DEMO_PARAMS, PROVIDERS, fake_gpus
from node.node import Node, NodeConfig, ProviderSettings
from node.spot import SpotSettings
from protocol.encoding import decode
from protocol.eth import keccak, private_key_address
from protocol.evidence import verify_bundle
from protocol.messages import EvidenceBundle


class Feed(BaseHTTPRequestHandler):
    price = "50"

    def do_GET(self):  # noqa: N802
        import time

        body = json.dumps({"timestamp": int(time.time()), "price_per_mwh": type(self).price}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


async def wait_until(predicate, timeout_s, step_s=0.1):
    with trio.fail_after(timeout_s):  # a hang guard, not a timing assertion
        while not predicate():
            await trio.sleep(step_s)


def embedded_market():
    chain = Chain.embedded()
    keys = chain.dev_keys()
    chain.deploy_local_market(keys[0])
    chain.fund(private_key_address(keys[1]), token_units=10**9, minter_key=keys[0])
    return chain, keys[1], keys[2], None


def anvil_market():
    """The devnet: an anvil process, the escrow and token deployed, a block every second."""
    anvil = AnvilProcess().start()
    deployer, renter, provider = (keccak(b"spot wallet " + n) for n in (b"deployer", b"renter", b"provider"))
    for k in (deployer, renter, provider):
        anvil.fund(private_key_address(k), 10**21)
    chain = Chain.connect(anvil.url, chain_id=anvil.chain_id)
    escrow, token = chain.deploy_local_market(deployer)
    chain = Chain.connect(anvil.url, escrow=escrow, token=token)
    chain.fund(private_key_address(renter), token_units=10**9, minter_key=deployer)
    chain.w3.provider.make_request("evm_setIntervalMining", [1])
    return chain, renter, provider, anvil


@pytest.mark.parametrize("market", [
    embedded_market,
    pytest.param(anvil_market, marks=pytest.mark.skipif(
        find_anvil() is None, reason="anvil not installed (set GPUMARKET_ANVIL)")),
], ids=["embedded-evm", "anvil-devnet"])
async def test_spot__price_spike_preempts_with_notice_pays_exactly_and_the_offer_comes_back(tmp_path, market):
    chain, renter_key, provider_key, anvil = market()
    try:
        await _scenario(tmp_path, chain, renter_key, provider_key)
    finally:
        if anvil is not None:
            anvil.stop()


async def _scenario(tmp_path, chain, renter_key, provider_key):
    handler = type("SpotFeed", (Feed,), {})
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/rt-price"

    renter_wallet, provider_wallet = private_key_address(renter_key), private_key_address(provider_key)
    if chain.tester is not None:
        await trio.sleep(chain.lead_s())  # eth-tester's clock runs ahead
    achain = AsyncChain(chain)
    notice_s = 4
    spot = SpotSettings(interruptible_gpus=1, notice_s=notice_s, price_per_gpu_hour=Decimal("0.36"),
                        power_source=url, power_poll_s=0.3, curtail_above_per_mwh=Decimal(300),
                        resume_below_per_mwh=Decimal(150))
    settings = ProviderSettings(price_per_gpu_hour=Decimal("0.45"), min_duration_s=5,
                                max_duration_s=3600, heartbeat_interval_s=1, grace_s=300,
                                publish_interval_s=0.2, nvml=fake_gpus(PROVIDERS[0]), spot=spot)
    provider = Node(NodeConfig(tmp_path / "p", provider_key, params=DEMO_PARAMS, provider=settings,
                               name="provider", chain_poll_s=0.3), achain)
    hook_out = tmp_path / "preempted.txt"
    renter = Node(NodeConfig(tmp_path / "r", renter_key, params=DEMO_PARAMS, name="renter",
                             chain_poll_s=0.3,
                             on_preempt=("sh", "-c", f'echo "$GPUMARKET_REASON $GPUMARKET_STOP_MS" > {hook_out}')),
                  achain)
    renter_before = chain.token_balance(renter_wallet)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(provider.run)
            await nursery.start(renter.run)
            await renter.host.connect(provider.addrs()[0])

            def held():
                return renter.book.held(provider.key.public)

            await wait_until(lambda: held() is not None and held().offer.interruptible, 15)
            offer = held().offer
            (spot_set,) = offer.interruptible
            assert spot_set.notice_s == notice_s and len(offer.gpus) == 2
            assert renter.search("class=interruptible notice>=4", "price") != []
            (hit,) = await ControlServer(renter, tmp_path / "r").op_search("class=interruptible notice>=4")
            assert hit["interruptible"] == [{"gpus": 1, "notice_s": notice_s, "price_per_gpu_hour": "0.36"}]
            quote = await ControlServer(renter, tmp_path / "r").op_quote(hit["offer_id"], 600, 1, notice_s)
            assert quote["deposit"] == 100 * 600
            price = spot_set.price_per_gpu_second  # 0.36 USDC/h = 100 units/s
            assert price == 100 < offer.terms.price_per_gpu_second == 125

            rental = await renter.rent([held()], gpu_count=1, duration_s=600,
                                       max_price_per_gpu_second=price, notice_s=notice_s)
            aid = rental.agreement_id
            assert rental.details.notice_s == notice_s and rental.details.gpus == spot_set.gpus
            await wait_until(lambda: rental.session.log.receipts >= 3, 20)
            assert provider.curtailment is None

            handler.price = "412.5"  # the spike
            await wait_until(lambda: provider.curtailment is not None, 10)
            assert provider.curtailment["reason"] == "power_price"
            assert provider.curtailment["price_per_mwh"] == "412.5"
            p_machine = provider.rentals[aid].session.machine
            notice = p_machine.notice
            assert notice is not None and notice.stop_ms - notice.sent_ms == notice_s * 1000
            # The renter holds the notice and ran its hook with it.
            await wait_until(lambda: rental.session.machine.notice is not None, 5)
            await wait_until(lambda: hook_out.exists() and hook_out.read_text().strip(), 10)
            assert hook_out.read_text().split() == ["1", str(notice.stop_ms)]
            # `gpumarket status` says why; `gpumarket rentals` shows the notice and time left.
            status = await ControlServer(provider, tmp_path / "p").op_status()
            assert status["curtailment"]["reason"] == "power_price"
            assert status["power_price"]["per_mwh"] == "412.5"
            (row,) = await ControlServer(renter, tmp_path / "r").op_rentals()
            assert row["class"] == "interruptible" and row["notice"]["stop_ms"] == notice.stop_ms
            assert 0 <= row["notice"]["time_left_s"] <= notice_s
            # While curtailed, the interruptible GPU is not offered (the rented one aside, the
            # other GPU is on-demand, so the offer stays with no interruptible set).
            await wait_until(lambda: held() is not None and not held().offer.interruptible
                             and held().seq > offer.seq, 10)

            # Service ends at the stop; the provider claims on the final receipt at once.
            await wait_until(lambda: any(e.name == "Claimed" and e.agreement_id == aid
                                         for e in chain.events()), 30)
            claimed = next(e for e in chain.events() if e.name == "Claimed" and e.agreement_id == aid)
            acked = claimed.args["acked_seconds"]
            assert p_machine.stopped_ms >= notice.stop_ms  # served until the promised stop
            assert rental.session.machine.acked_seconds == acked
            # Paid exactly the acknowledged seconds: the rest of the deposit came back at once.
            assert claimed.args["provider_amount"] == price * acked
            assert chain.token_balance(renter_wallet) == renter_before - price * acked
            assert chain.token_balance(provider_wallet) == price * acked
            # The acknowledged time is the service until the stop (within a heartbeat and the
            # late tolerance; the renter pays on its own clock, so never beyond the stop).
            served_s = (notice.stop_ms - rental.started_s * 1000) / 1000
            assert served_s - 3 <= acked <= served_s + 1
            await wait_until(lambda: rental.session.machine.state == "done", 10)
            assert p_machine.state == "done"
            # The renter's evidence holds the notice; the provider kept its promise.
            doc = await ControlServer(renter, tmp_path / "r").op_evidence(aid.hex())
            verdict = verify_bundle(decode(bytes.fromhex(doc["bundle"]), EvidenceBundle))
            assert verdict.notice.stop_ms == notice.stop_ms and verdict.notice_faults == ()
            assert verdict.acked_seconds == acked

            handler.price = "90"  # the price falls: the interruptible GPU is offered again
            await wait_until(lambda: provider.curtailment is None, 10)
            await wait_until(lambda: held() is not None and held().offer.interruptible, 15)
            assert held().offer.interruptible[0].gpus == spot_set.gpus
            nursery.cancel_scope.cancel()
    finally:
        server.shutdown()
        server.server_close()
