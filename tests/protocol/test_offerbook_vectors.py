"""specs/vectors/offerbook.json and the code agree: regenerate and compare, then replay the
vector with a small independent model of the caps, the keep order and the rank tiers written
here from specs/offerbook.md (not from protocol/offerbook.py)."""

import hashlib
import json

import msgpack

from protocol.encoding import decode
from tests.protocol.offerbook_vectors import VECTOR, build, render

DOC = json.loads(VECTOR.read_text())


def test_offerbook_vectors__committed_file_matches_the_code():
    assert VECTOR.read_text() == render(build()), (
        "specs/vectors/offerbook.json is stale: run python -m tests.protocol.offerbook_vectors")


def _expires_ms(data: bytes) -> int:
    # Offer = [type, version, provider, seq, created_ms, expires_ms, ...] (specs/wire.md)
    return msgpack.unpackb(data, raw=False)[5]


def _wallet(data: bytes) -> str:
    return decode(data).binding.wallet.hex()


def test_offerbook_vectors__replay_with_an_independent_model():
    params, scores, unknown = DOC["params"], DOC["scores"], DOC["unknown_score"]
    proven_wallets = set(DOC["proven_wallets"])
    held: dict[str, dict] = {}  # provider -> score, since, expires, size, digest, seq, wallet

    def proven_offer(p: str, h: dict, others: dict) -> int:
        # 1 iff p's wallet is proven and no other held offer of it comes first by (since, key)
        if h["wallet"] not in proven_wallets:
            return 0
        mine = (h["since"], bytes.fromhex(p))
        return int(all((o["since"], bytes.fromhex(q)) > mine for q, o in others.items()
                       if q != p and o["wallet"] == h["wallet"]))

    def keep_key(p: str) -> tuple:  # weakest first
        h = held[p]
        return (h["score"], proven_offer(p, h, held), -h["since"], h["expires"], h["digest"])

    for step in DOC["steps"]:
        p, now, data = step["provider"], step["now_ms"], bytes.fromhex(step["wire_hex"])
        mine = held.get(p)
        new = {"score": scores.get(p, unknown), "since": mine["since"] if mine else now,
               "expires": _expires_ms(data), "size": len(data),
               "digest": hashlib.sha256(data).digest(), "seq": msgpack.unpackb(data)[3],
               "wallet": _wallet(data)}
        total = sum(h["size"] for h in held.values())
        over = total - (mine["size"] if mine else 0) + new["size"] - params["book_max_bytes"]
        need_slot = mine is None and len(held) >= params["book_max_providers"]
        victims, freed, ok = [], 0, True
        if need_slot or over > 0:
            rank = (new["score"], proven_offer(p, new, held), -new["since"], new["expires"])
            for q in sorted((q for q in held if q != p), key=keep_key):
                if keep_key(q)[:4] >= rank:
                    break
                victims.append(q)
                freed += held[q]["size"]
                if freed >= over:
                    break
            ok = bool(victims) and freed >= over
        if ok:
            for q in victims:
                del held[q]
            held[p] = new
        assert step["verdict"] == ("accept" if ok else "ignore:book_full"), step["now_ms"]
        assert step["evicted"] == (victims if ok else [])
        assert step["book_bytes_after"] == sum(h["size"] for h in held.values())
        assert step["book_bytes_after"] <= params["book_max_bytes"]

    assert sorted(held) == [h["provider"] for h in DOC["held"]]
    assert all(held[h["provider"]]["since"] == h["since_ms"] for h in DOC["held"])

    def price(p: str) -> int:
        # every offer in the vector is paid in the same token: compare the raw unit price
        last = next(s["wire_hex"] for s in reversed(DOC["steps"])
                    if s["provider"] == p and s["verdict"] == "accept")
        return decode(bytes.fromhex(last)).terms.price_per_gpu_second

    cutoff = DOC["rank"]["now_ms"] - params["book_established_ms"]

    wallet = {h["provider"]: h["wallet"] for h in DOC["held"]}
    firsts: dict[str, tuple] = {}  # proven wallet -> (since, provider) of its first offer
    for p in held:
        if wallet[p] in DOC["proven_wallets"]:
            k = (held[p]["since"], bytes.fromhex(p))
            firsts[wallet[p]] = min(firsts.get(wallet[p], k), k)
    proven = {k[1].hex() for k in firsts.values()}
    assert proven  # the vector covers the proven tier

    def tier(p: str) -> int:
        s = held[p]["score"]
        if s > unknown:
            return 0
        if s < unknown:
            return 4
        if p in proven:
            return 1
        return 2 if held[p]["since"] <= cutoff else 3

    def digest(p: str) -> bytes:
        return held[p]["digest"]

    assert DOC["rank"]["order"] == sorted(held, key=lambda p: (tier(p), price(p), digest(p)))
    assert DOC["price"]["order"] == sorted(held, key=lambda p: (price(p), digest(p)))
