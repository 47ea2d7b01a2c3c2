"""Builds specs/vectors/arbitration.json (run: python -m tests.protocol.arbitration_vectors).

Evidence bundles of interruptible and on-demand agreements that name an arbiter, each with the
verdict's notice faults and the ruling `protocol.evidence.arbiter_ruling` gives
(specs/evidence.md, "Arbitration"). The agreements come from tests/rental_fixtures.py with fixed
seeds (test keys: never use them for real funds); the rentals run on a virtual clock, so the
bundles are the same bytes on every run.
"""

from __future__ import annotations

import sys

from protocol.evidence import arbiter_ruling, build_bundle, verify_bundle
from protocol.messages import PreemptionNotice, PreemptionReason, digest
from tests.protocol.vectors import VECTORS_DIR, render
from tests.rental_fixtures import RentalPair, make_agreement

T0 = 1_700_000_000_000
ARBITER = bytes.fromhex("ab" * 20)
POWER = int(PreemptionReason.POWER_PRICE)
FILE = "arbitration.json"


def agreement(notice_s: int, seed: int = 5):
    return make_agreement(seed, max_seconds=600, interval=10, price=7, notice_s=notice_s,
                          arbiter=ARBITER, dispute_window=300)


def pair_bundle(a, **kw):
    pair = RentalPair(a, start_ms=T0, **kw)
    try:
        pair.run(max_steps=20_000)
    except AssertionError:
        pass  # with an arbiter the claim waits for the dispute window: nothing settles here
    records = [[b for side in ("provider", "renter") for b in pair.records(side, kind)]
               for kind in ("heartbeat", "receipt", "notice")]
    return build_bundle(a.terms, a.details, a.provider_binding, a.renter_binding, T0 // 1000, *records)


def forged(a, sent_ms, stop_ms, after):
    return PreemptionNotice(a.agreement_id, stop_ms, POWER, "price spike", after, sent_ms).sign(a.provider)


def served_bundle(a, upto_s: int, notice=None):
    """Heartbeats every 10 s up to `upto_s` with the renter's receipts for each (driven through
    the real machines), then both sides stop; plus `notice(heartbeat_hashes)`, a notice signed
    by the provider that may name one of them."""
    pair = RentalPair(a, start_ms=T0, renter_vanish_ms=T0 + upto_s * 1000 + 1,
                      provider_crash_ms=T0 + upto_s * 1000 + 1)
    try:
        pair.run(max_steps=20_000)
    except AssertionError:
        pass
    hbs = pair.records("provider", "heartbeat")
    notices = [notice([digest(h) for h in hbs]).encode()] if notice else []
    return build_bundle(a.terms, a.details, a.provider_binding, a.renter_binding, T0 // 1000,
                        hbs, pair.records("renter", "receipt"), notices)


def cases() -> list[tuple[str, object]]:
    a = agreement(60)  # interruptible: 60 s of notice promised, 600 s at 7 units/s
    b = agreement(0, seed=6)  # on-demand, 600 s
    return [
        ("honest_preemption", pair_bundle(a, preempt=(T0 + 100_000, T0 + 160_000, POWER))),
        ("stopped_early", pair_bundle(a, preempt=(T0 + 100_000, T0 + 160_000, POWER),
                                      provider_crash_ms=T0 + 125_000)),
        # Notices a dishonest provider signed over a served record: its own signatures prove them.
        ("short_notice", served_bundle(a, 120, lambda h: forged(a, T0 + 100_000, T0 + 120_000, h[10]))),
        ("notice_backdated", served_bundle(a, 120, lambda h: forged(a, T0 + 5_000, T0 + 65_000, h[2]))),
        ("short_notice_and_stopped_early",
         served_bundle(a, 120, lambda h: forged(a, T0 + 180_000, T0 + 200_000, h[12]))),
        ("notice_on_demand_near_the_end",
         served_bundle(b, 590, lambda h: forged(b, T0 + 570_000, T0 + 580_500, h[57]))),
        ("notice_on_demand_early",
         served_bundle(b, 200, lambda h: forged(b, T0 + 100_000, T0 + 200_500, h[10]))),
    ]


def build() -> dict:
    vectors = []
    for name, bundle in cases():
        verdict = verify_bundle(bundle)
        ruling = arbiter_ruling(bundle)
        vectors.append({"name": name, "bundle_hex": bundle.encode().hex(),
                        "notice_faults": list(verdict.notice_faults),
                        "claim_provider_amount": verdict.payout.to_json()["provider"],
                        "ruling": ruling.to_json_dict()})
    a, b = agreement(60), agreement(0, seed=6)
    keys = {"warning": "test keys: never use them for real funds",
            "agreements": [{"seed": 5, "notice_s": 60, "provider_ed25519_public": a.provider.public.hex(),
                            "renter_ed25519_public": a.renter.public.hex()},
                           {"seed": 6, "notice_s": 0, "provider_ed25519_public": b.provider.public.hex(),
                            "renter_ed25519_public": b.renter.public.hex()}]}
    return {"keys": keys, "params": "defaults (specs/parameters.md)", "cases": vectors}


def main() -> int:
    (VECTORS_DIR / FILE).write_text(render(build()))
    print(f"wrote {VECTORS_DIR / FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
