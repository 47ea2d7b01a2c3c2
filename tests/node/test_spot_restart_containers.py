"""A provider restarted during a preemption notice, with the Docker runtime (real daemon, real
libp2p on loopback, the embedded EVM): the resumed rental keeps the notice, the rental's
container runs again with its processes told again (SIGTERM), and it is removed at the notice's
stop, not before; the renter pays exactly the acknowledged seconds. (The provider is stopped by
cancelling its node, a graceful stop, which removes its containers: the resume starts a new
one. A killed node's container is kept and resumed: node/node.py `_stop_all_runtimes`.)"""

from __future__ import annotations

from decimal import Decimal
from functools import partial

import pytest
import trio

from node.spot import SpotSettings
from protocol.eth import private_key_address
from protocol.messages import PreemptionReason
from protocol.rental import State
from tests.docker_image import busybox_image, docker_client, no_daemon_reason
from tests.node.node_helpers import funded_market, start_node
from tests.node.test_rental_containers_choice import (LABEL_PROVIDER, PARAMS, container_of, containers,
                                                      provider_settings, wait_until)

pytestmark = pytest.mark.skipif(docker_client() is None, reason=no_daemon_reason())
NOTICE_S = 20  # room for a provider restart and a container check inside the notice
PRICE = 100  # units per second: 0.36 per GPU-hour at 6 decimals


start = partial(start_node, params=PARAMS, chain_poll_s=0.3)


async def test_spot_restart__docker_container_told_again_and_removed_at_the_promised_stop(tmp_path):
    chain, achain, keys = await funded_market(renter=1, token_units=10**9)
    renter_wallet = private_key_address(keys[1])
    before = chain.token_balance(renter_wallet)
    spot = SpotSettings(interruptible_gpus=1, notice_s=NOTICE_S, price_per_gpu_hour=Decimal("0.36"))
    settings = provider_settings((busybox_image(),), spot)
    provider = None
    try:
        async with trio.open_nursery() as nursery:
            provider, p_scope = await start(nursery, achain, tmp_path / "p", keys[2], settings)
            listen = provider.addrs()[0].split("/p2p/")[0]
            renter, _ = await start(nursery, achain, tmp_path / "r", keys[1])
            await renter.host.connect(provider.addrs()[0])
            await wait_until(lambda: (e := renter.book.held(provider.key.public)) is not None
                             and e.offer.interruptible, 20)
            rental = await renter.rent([renter.book.held(provider.key.public)], gpu_count=1,
                                       duration_s=600, max_price_per_gpu_second=PRICE, notice_s=NOTICE_S)
            aid = rental.agreement_id
            await wait_until(lambda: (c := container_of(provider, aid)) is not None
                             and c["State"] == "running", 60)
            await wait_until(lambda: rental.session.log.receipts >= 1, 20)
            cid = container_of(provider, aid)["Id"]

            assert await provider.preempt_interruptible(PreemptionReason.OTHER, "test") == [aid]
            notice = provider.rentals[aid].session.machine.notice
            await wait_until(lambda: "SIGTERM" in provider.rentals[aid].events, NOTICE_S)
            p_scope.cancel()  # the provider goes down with the notice outstanding
            await trio.sleep(0.3)

            provider, p_scope = await start(nursery, achain, tmp_path / "p", keys[2], settings, listen=listen)
            assert provider.resumed == {"resumed": [aid.hex()]}
            p_rental = provider.rentals[aid]
            assert p_rental.session.machine.state is State.NOTICE
            assert p_rental.session.machine.notice.encode() == notice.encode()
            # The rental's container runs again (a new one: the graceful stop removed the old)
            # and its processes are told again; it stays until the stop.
            await wait_until(lambda: "SIGTERM" in p_rental.events, NOTICE_S)
            assert container_of(provider, aid)["Id"] != cid
            assert container_of(provider, aid)["State"] == "running"
            assert provider.clock.now_ms() < notice.stop_ms
            await wait_until(lambda: container_of(provider, aid) is None, NOTICE_S + 30)
            assert provider.clock.now_ms() >= notice.stop_ms  # removed at the stop, not before
            assert p_rental.session.machine.stopped_ms >= notice.stop_ms

            await wait_until(lambda: any(e.name == "Claimed" and e.agreement_id == aid
                                         for e in chain.events()), 30)
            claimed = next(e for e in chain.events() if e.name == "Claimed" and e.agreement_id == aid)
            acked = claimed.args["acked_seconds"]
            assert claimed.args["provider_amount"] == PRICE * acked
            assert chain.token_balance(renter_wallet) == before - PRICE * acked
            assert acked <= (notice.stop_ms - rental.started_s * 1000) / 1000
            nursery.cancel_scope.cancel()
    finally:
        if provider is not None:
            for c in containers(**{LABEL_PROVIDER: provider.peer_id.to_base58()}):
                docker_client().api.remove_container(c["Id"], force=True)
