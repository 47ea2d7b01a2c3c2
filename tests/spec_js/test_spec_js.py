"""The second implementer: tests/spec_js/ is a JavaScript implementation of the wire protocol written
from specs/ alone (encoding and decoding of every message, the decoding error codes, message ids,
signatures, the agreement id and EIP-712 digests, wallet bindings, offer validation verdicts, the
text rule, exec frames, the offer book's admission and ranking, the query language with its
classes, the arbiter's ruling from an evidence bundle). This runs it over every file in
specs/vectors/ and fails on any mismatch, so a vector, or a spec rule the JS code was written from,
that drifts from what protocol/ does shows up here. Needs ``node`` and the @noble packages that
.ci/run installs into tests/interop/node_modules (``npm ci --prefix tests/interop``); skipped with
that reason only when they are absent."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
VECTORS = ROOT / "specs" / "vectors"
RUNNER = HERE / "run_vectors.mjs"
NODE = shutil.which("node")
NOBLE = HERE.parent / "interop" / "node_modules" / "@noble"


def _missing() -> str | None:
    if NODE is None:
        return "node (Node.js) is not installed"
    for package in ("curves", "hashes"):
        if not (NOBLE / package / "package.json").is_file():
            return f"npm package @noble/{package} is not installed in tests/interop (see .ci/run)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _run(vectors: Path) -> tuple[int, dict]:
    done = subprocess.run([NODE, str(RUNNER), "--json"], capture_output=True, text=True, timeout=120,
                          env={"SPEC_VECTORS_DIR": str(vectors), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip(), f"runner printed nothing; stderr:\n{done.stderr}"
    return done.returncode, json.loads(done.stdout)


def test_js_implementation_agrees_with_every_vector() -> None:
    rc, results = _run(VECTORS)
    files = sorted(p.name for p in VECTORS.glob("*.json"))
    assert sorted(results) == files, "the JS runner must check every vector file"
    failures = [f"{name}: {line}" for name, r in results.items() for line in r["failures"]]
    assert not failures, "\n".join(failures)
    assert rc == 0
    for name, r in results.items():
        assert r["pass"] > 0, name


def test_runner_reports_a_corrupted_vector(tmp_path: Path) -> None:
    """The check can fail: one flipped signature byte in wire.json and one changed decoding code."""
    for path in VECTORS.iterdir():
        shutil.copy(path, tmp_path / path.name)
    wire = json.loads((VECTORS / "wire.json").read_text())
    first = wire["valid"][0]
    first["wire_hex"] = first["wire_hex"][:-2] + ("00" if first["wire_hex"][-2:] != "00" else "01")
    (tmp_path / "wire.json").write_text(json.dumps(wire))
    decoding = json.loads((VECTORS / "decoding.json").read_text())
    case = next(c for c in decoding["cases"] if c["code"] == "truncated")
    case["code"] = "malformed"
    (tmp_path / "decoding.json").write_text(json.dumps(decoding))
    rc, results = _run(tmp_path)
    assert rc == 1
    assert results["wire.json"]["fail"] >= 1
    assert any(case["name"] in line for line in results["decoding.json"]["failures"])
    assert results["binding.json"]["fail"] == 0


# --------------------------------------------------------------------------------------------
# Differential checks beyond the vectors: inputs made here from the vectors by seeded random
# changes, judged by protocol/ and by the JS implementation (tests/spec_js/oracle.mjs).

ORACLE = HERE / "oracle.mjs"


def _oracle(items: list[dict]) -> list:
    done = subprocess.run([NODE, str(ORACLE)], input=json.dumps(items), capture_output=True,
                          text=True, timeout=300, check=True)
    return json.loads(done.stdout)


def _vector_wires() -> list[bytes]:
    out: list[bytes] = []

    def walk(x) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "wire_hex" and isinstance(v, str) and v:
                    out.append(bytes.fromhex(v))
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for path in sorted(VECTORS.glob("*.json")):
        walk(json.loads(path.read_text()))
    return out


_SPECIAL = (0xC0, 0xC1, 0xC2, 0xC3, 0xCA, 0xCB, 0xD4, 0xD6, 0xD7, 0xD8, 0xC7, 0x80, 0x81, 0x90,
            0x91, 0x9F, 0xDC, 0xDD, 0xDE, 0xDF, 0xA0, 0xA1, 0xD9, 0xDA, 0xC4, 0xC5, 0xCC, 0xCD,
            0xCE, 0xCF, 0xD0, 0xD3, 0xFF, 0xE0, 0x00, 0x7F, 0x01, 0x02)


def _mutate(rng, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3))):
        i = rng.randrange(len(b) + 1)
        op = rng.randrange(6)
        if op == 0 and b:
            b[min(i, len(b) - 1)] = rng.randrange(256)
        elif op == 1 and b:
            b[min(i, len(b) - 1)] = rng.choice(_SPECIAL)
        elif op == 2:
            del b[i:]
        elif op == 3:
            b[i:i] = bytes([rng.choice(_SPECIAL)])
        elif op == 4 and b:
            del b[min(i, len(b) - 1)]
        else:
            b += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4)))
    return bytes(b)


def test_decoding_agrees_with_protocol_on_mutated_messages() -> None:
    import random

    from protocol import messages
    from protocol.encoding import decode
    from protocol.errors import ProtocolError

    rng = random.Random(20261203)
    names = ("Offer", "OfferWithdrawal", "Proposal", "Heartbeat", "UsageReceipt", "AccessGrant")
    seeds = _vector_wires()
    items, want = [], []
    for _ in range(3000):
        data = _mutate(rng, rng.choice(seeds))
        expect = rng.choice(names) if rng.random() < 0.3 else None
        try:
            decode(data, getattr(messages, expect) if expect else None)
            want.append(None)
        except ProtocolError as exc:
            want.append(exc.code)
        items.append({"op": "decode", "hex": data.hex(), "expect": expect})
    got = _oracle(items)
    diffs = [(i["expect"], i["hex"][:120], w, g) for i, w, g in zip(items, want, got) if w != g]
    assert not diffs, f"{len(diffs)} of {len(items)} differ, first: {diffs[:5]}"
    assert len(set(want)) >= 8  # the mutations reach most decoding codes


def _variants(rng, offer, provider_wallet: bytes, other_wallet: bytes):
    """Offers with one or two fields changed to edge values (signed again by the caller)."""
    import dataclasses

    from protocol.encoding import Amount, FixedBytes, ListOf, Struct, Text, UInt

    def edge(kind, value):
        if isinstance(kind, UInt):
            return rng.choice((0, 1, 4, 5, 299, 300, 600, 601, 604_800, 604_801, 2_592_001, 36, 37,
                               kind.max, value + 1, max(value - 1, 0), value))
        if isinstance(kind, Amount):
            return rng.choice((0, 1, 138, 139, 140, 2**256 - 1, 2**200, value))
        if isinstance(kind, FixedBytes):
            return rng.choice((bytes(kind.size), bytes([0xAB]) * kind.size,
                               (provider_wallet if kind.size == 20 else value),
                               (other_wallet if kind.size == 20 else value),
                               value[:-1] + bytes([value[-1] ^ 1])))
        if isinstance(kind, Text):
            return rng.choice(("", "x", value))
        if isinstance(kind, ListOf):
            if isinstance(kind.item, Struct) and value:
                return rng.choice(((), value[:1], (value[0], value[0]), value[::-1]))
            return value
        return value

    def change(obj):
        fields = [f for f in dataclasses.fields(obj) if f.name != "signature"]
        f = rng.choice(fields)
        kind, value = f.metadata["wire"], getattr(obj, f.name)
        if isinstance(kind, Struct):
            return dataclasses.replace(obj, **{f.name: change(value)})
        if isinstance(kind, ListOf) and isinstance(kind.item, Struct) and value and rng.random() < 0.5:
            i = rng.randrange(len(value))
            return dataclasses.replace(obj, **{f.name: (*value[:i], change(value[i]), *value[i + 1:])})
        return dataclasses.replace(obj, **{f.name: edge(kind, value)})

    for _ in range(rng.choice((1, 1, 2))):
        offer = change(offer)
    return offer


def test_offer_verdicts_agree_with_protocol_on_changed_offers() -> None:
    import dataclasses
    import random

    from protocol.encoding import decode

    from protocol.errors import ProtocolError, RemoteProtocolError
    from protocol.identity import PeerKey
    from protocol.messages import InterruptibleGpus, digest
    from protocol.params import Params
    from protocol.validation import BindingCache, validate_offer

    wire = json.loads((VECTORS / "wire.json").read_text())
    keys = wire["keys"]
    provider = PeerKey(bytes.fromhex(keys["provider_ed25519_seed"]))
    bases = [decode(bytes.fromhex(v["wire_hex"])) for v in wire["valid"] if v["type"] == "Offer"]
    rng = random.Random(31337)
    now = bases[0].created_ms
    items, want = [], []
    while len(items) < 600:
        offer = _variants(rng, rng.choice(bases), bytes.fromhex(keys["provider_wallet"]),
                          bytes.fromhex(keys["renter_wallet"]))
        if rng.random() < 0.1:
            g = offer.gpus
            spot = InterruptibleGpus((g[-1].uuid_digest,) if g else (), rng.choice((0, 60)),
                                     rng.choice((0, 100, 139)))
            offer = dataclasses.replace(offer, interruptible=(spot,))
        try:
            data = offer.sign(provider).encode()
        except ProtocolError:
            continue  # the encoder refuses it (out of its kind): not a wire message
        if rng.random() < 0.1:
            data = data[:-1] + bytes([data[-1] ^ 1])
        held = rng.choice(({}, {"known_seq": offer.seq, "known_digest": digest(data).hex()},
                           {"known_seq": offer.seq, "known_digest": "00" * 32},
                           {"known_seq": offer.seq + 1, "known_digest": "00" * 32},
                           {"withdrawn_seq": offer.seq}, {"chain_ids": [1]}))
        now_ms = now + rng.choice((0, 0, 0, -30_001, 7_300_000))
        try:
            validate_offer(data, now_ms, Params(), BindingCache(4),
                           known_seq=held.get("known_seq", -1),
                           known_digest=bytes.fromhex(held["known_digest"]) if "known_digest" in held else None,
                           withdrawn_seq=held.get("withdrawn_seq", -1),
                           chain_ids=frozenset(held["chain_ids"]) if "chain_ids" in held else None)
            want.append("accept")
        except RemoteProtocolError as exc:
            want.append(f"{exc.verdict}:{exc.code}")
        items.append({"op": "offer", "hex": data.hex(), "now_ms": now_ms, **held})
    got = _oracle(items)
    diffs = [(w, g, i["hex"]) for i, w, g in zip(items, want, got) if w != g]
    assert not diffs, f"{len(diffs)} of {len(items)} differ, first: {diffs[:3]}"
    assert len(set(want)) >= 10  # the changes reach many rows


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_offer_book_agrees_with_protocol_on_random_scenarios(tmp_path: Path, seed: int) -> None:
    """Random ingests (new providers, re-announcements, equivocations, expiries; small caps;
    proven wallets, one with two keys)
    through protocol.offerbook.OfferBook, written as an offerbook.json that the JS model of
    specs/offerbook.md (tests/spec_js/offerbook.mjs) must replay step for step."""
    import random

    from protocol.errors import RemoteProtocolError
    from protocol.messages import Binding
    from protocol.offerbook import OfferBook
    from protocol.params import Params
    from protocol.samples import GPU_MODELS, make_offer, make_provider

    rng = random.Random(seed)
    names = [f"p{i}" for i in range(7)]
    keys = {n: make_provider(random.Random(f"book-{seed}-{n}")) for n in names}
    # p6 is a second key of p5's wallet, which is proven: one proven offer per wallet
    keys["p6"] = (keys["p6"][0], keys["p5"][1], Binding.create(keys["p6"][0], keys["p5"][1], 31337))
    scores = {keys[n][0].public.hex(): rng.choice((0.2, 0.5, 0.5, 0.5, 0.9)) for n in names}
    proven = {keys[n][2].wallet.hex() for n in ("p5", rng.choice(names[:5]))}
    slim = len(make_offer(*keys[names[0]][::2], random.Random(0), 1, model=GPU_MODELS[3]).encode())
    params = Params().replace(book_max_providers=4, book_max_bytes=3 * slim + rng.randrange(2000),
                              book_established_ms=60_000)
    book = OfferBook(params, score_of=lambda p: scores.get(p.hex(), 0.5),
                     proven_of=lambda w: w.hex() in proven)
    evicted: list[str] = []
    book.on_evict = lambda e: evicted.append(e.provider.hex())
    now, seqs, steps = 1_767_225_600_000, {n: 0 for n in names}, []
    for i in range(40):
        now += rng.choice((500, 1_000, 5_000, 40_000, 95_000))
        n = rng.choice(names)
        seqs[n] += rng.choice((1, 1, 1, 0))
        peer, _, binding = keys[n]
        data = make_offer(peer, binding, random.Random(f"{n}-{seqs[n]}-{i % 3}"), now,
                          seq=max(seqs[n], 1), model=GPU_MODELS[3], gpu_count=rng.choice((1, 1, 2, 8)),
                          region="eu-frankfurt", price_per_gpu_second=rng.randrange(50, 200),
                          lifetime_ms=rng.choice((60_000, 120_000, 3_600_000))).encode()
        book.expire(now)
        evicted.clear()
        try:
            book.ingest_offer(data, now)
            verdict = "accept"
        except RemoteProtocolError as exc:
            verdict = f"{exc.verdict}:{exc.code}"
        steps.append({"provider": peer.public.hex(), "now_ms": now, "wire_hex": data.hex(),
                      "size": len(data), "verdict": verdict, "evicted": list(evicted),
                      "book_bytes_after": book.bytes})
    rank_now = now + 1_000
    doc = {
        "params": {"book_max_providers": params.book_max_providers, "book_max_bytes": params.book_max_bytes,
                   "book_established_ms": params.book_established_ms, "clock_skew_ms": params.clock_skew_ms},
        "scores": scores, "unknown_score": 0.5, "proven_wallets": sorted(proven), "steps": steps,
        "held": sorted(({"provider": e.provider.hex(), "seq": e.seq, "since_ms": e.since_ms,
                         "digest": e.digest.hex(), "wallet": e.wallet.hex()} for e in book),
                       key=lambda r: r["provider"]),
        "rank": {"now_ms": rank_now, "query": "",
                 "order": [e.provider.hex() for e in book.query("", "rank", now_ms=rank_now)]},
        "price": {"query": "", "order": [e.provider.hex() for e in book.query("", "price")]},
    }
    assert len({s["verdict"] for s in steps}) >= 3
    for path in VECTORS.iterdir():
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "offerbook.json").write_text(json.dumps(doc, sort_keys=True))  # as the vectors: keys sorted
    _, results = _run(tmp_path)
    failures = results["offerbook.json"]["failures"]
    assert failures == [], "\n".join(failures)


def test_wallet_signature_codes_agree_with_protocol() -> None:
    """protocol.eth.recover_signer and the JS steps of wire.md ("Wallet signatures") give the
    same address or the same code for signatures with r, s and v at and around their edges."""
    import random

    from protocol.errors import RemoteProtocolError
    from protocol.eth import SECP256K1_N, recover_signer

    agreement = json.loads((VECTORS / "agreement.json").read_text())["agreement"]
    digest = bytes.fromhex(agreement["consent_digest"])
    good = bytes.fromhex(agreement["consent_signature"])
    r0, s0 = int.from_bytes(good[:32], "big"), int.from_bytes(good[32:64], "big")
    half = SECP256K1_N // 2
    rng = random.Random(7)
    rs = (0, 1, 2, 3, r0, half, half + 1, SECP256K1_N - 1, SECP256K1_N, 2**256 - 1)
    items, want = [], []
    for _ in range(400):
        r = rng.choice(rs + (rng.randrange(2**256),))
        s = rng.choice(rs + (s0, SECP256K1_N - s0, rng.randrange(2**256)))
        v = rng.choice((0, 1, 26, 27, 27, 28, 28, 29, good[64]))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big") + bytes([v])
        try:
            want.append(recover_signer(digest, sig).hex())
        except RemoteProtocolError as exc:
            want.append(exc.code)
        items.append({"op": "recover", "digest": digest.hex(), "sig": sig.hex()})
    items.append({"op": "recover", "digest": digest.hex(), "sig": good.hex()})
    want.append(agreement["terms"]["provider"])
    got = _oracle(items)
    diffs = [(i["sig"], w, g) for i, w, g in zip(items, want, got) if w != g]
    assert not diffs, f"{len(diffs)} differ, first: {diffs[:3]}"
    assert {"bad_signature_v", "bad_signature_high_s", "bad_signature"} <= set(want)


def _query_offers(rng, n: int):
    """Signed offers of several models, counts, regions, tokens and interruptible sets."""
    import dataclasses

    from protocol.messages import InterruptibleGpus
    from protocol.samples import GPU_MODELS, make_offer, make_provider

    now = 1_767_225_600_000
    out = []
    for i in range(n):
        peer, _, binding = make_provider(rng)
        price = rng.choice((40, 80, 99, 100, 110, 150, 200, 400, 700))
        o = make_offer(peer, binding, rng, now, model=rng.choice(GPU_MODELS), gpu_count=rng.choice((1, 2, 3, 4, 8)),
                       region=rng.choice(("eu-frankfurt", "eu-london", "us-dallas", "jp-tokyo")),
                       price_per_gpu_second=price)
        if rng.random() < 0.3:  # a token of 18 decimals, same symbol or another
            o = dataclasses.replace(o, terms=dataclasses.replace(
                o.terms, token_decimals=18, token_symbol=rng.choice(("USDC", "DAI")),
                price_per_gpu_second=price * 10**12 + rng.choice((0, 1))))
        if rng.random() < 0.3:
            o = dataclasses.replace(o, images=tuple(rng.sample(("pytorch/pytorch:2.4", "nvcr.io/nvidia/cuda:12.4",
                                                                "ubuntu:22.04"), rng.randrange(1, 3))))
        g = [x.uuid_digest for x in o.gpus]
        sets, at, notices = [], 0, rng.sample((1, 30, 60, 120, 600), 5)
        while at < len(g) and rng.random() < 0.6:
            size = rng.randrange(1, len(g) - at + 1)
            cut = o.terms.price_per_gpu_second
            sets.append(InterruptibleGpus(tuple(g[at:at + size]), notices.pop(), rng.randrange(1, cut)))
            at += size
        score = rng.choice((0.2, 0.5, 0.5, 0.9, 0.7))
        out.append((dataclasses.replace(o, interruptible=tuple(sets)).sign(peer), score))
    return now, out


_QUERY_TERMS = (
    "gpu=RTX_4090,A100*", "gpu!=RTX", "gpu=a100_sxm4", "gpu=A10", "gpu=rtx_[34]090", "vram>=24", "vram<40.5",
    "vram=80", "count>=2", "count=1", "count!=8", "price<=0.6", "price>0.2", "price<.36", "price>=0.36",
    "price=0.36", "price!=0.72", "price<=1.5", "region=eu-*", "region!=us-dallas", "region=EU-LONDON",
    "cuda>=12.2", "cuda<12", "cc>=8.9", "cc<8.6", "cc=8", "score>=0.5", "score<=0.9", "score>0.2", "score=0.7",
    "token=usdc", "token!=DAI", "chain=31337", "chain!=1,2", "image=pytorch/*", "image!=ubuntu:*",
    "class=interruptible", "class!=on-demand", "class=on*", "class=ON-DEMAND", "class=*", "notice>=60",
    "notice<100", "notice=30", "notice!=600", "price==0.36",
)
_BAD_TERMS = ("prcie<=1", "price<=abc", "gpu<3", "score>=1.5", "notice>=1.5", "class=on demand", "=4", "vram")


def test_query_results_agree_with_protocol_on_random_books() -> None:
    """protocol.offerbook.OfferBook.query (with its index plans) and the JS reading of
    specs/offerbook.md's query language and classes return the same offers in the same order for
    random queries over random books with interruptible sets."""
    import random

    from protocol.errors import LocalProtocolError
    from protocol.offerbook import OfferBook
    from protocol.params import Params

    rng = random.Random(4242)
    items, want, asked = [], [], []
    for _ in range(12):
        now, offers = _query_offers(rng, 60)
        scores = {o.provider: s for o, s in offers}
        book = OfferBook(Params(), score_of=lambda p: scores[p])
        for o, _ in offers:
            book.ingest_offer(o.encode(), now)
        queries = []
        for _ in range(40):
            terms = rng.sample(_QUERY_TERMS, rng.choice((1, 1, 2, 2, 3, 4)))
            if rng.random() < 0.05:
                terms.append(rng.choice(_BAD_TERMS))
            q = {"query": " ".join(terms), "limit": rng.choice((None, None, 1, 5, 20)),
                 "sort": rng.choice(("price", "-price", "vram", "-vram", "count", "-count", "score", "-score"))}
            try:
                want.append([e.digest.hex() for e in book.query(q["query"], q["sort"], q["limit"])])
            except LocalProtocolError as exc:
                assert exc.code == "bad_query"
                want.append("bad_query")
            queries.append(q)
        asked += queries
        items.append({"op": "query", "now_ms": now, "queries": queries,
                      "offers": [{"hex": o.encode().hex(), "score": s} for o, s in offers]})
    got = [r for answers in _oracle(items) for r in answers]
    diffs = [(q, w, g) for q, w, g in zip(asked, want, got) if w != g]
    assert len(got) == len(want) and not diffs, f"{len(diffs)} of {len(want)} differ, first: {diffs[:3]}"
    nonempty = [w for w in want if w and w != "bad_query"]
    assert len(nonempty) > len(want) // 3 and "bad_query" in want  # the queries select something


def test_arbiter_rulings_agree_with_protocol_on_changed_bundles() -> None:
    """protocol.evidence (verify_bundle's notice faults, arbiter_ruling) and the JS reading of
    specs/evidence.md give the same faults, claim and ruling on bundles of served rentals changed
    at random: forged notices (any stop, sent and after_heartbeat), dropped heartbeats and
    receipts, equivocating and back-dated heartbeats re-signed by the provider, foreign bytes."""
    import dataclasses
    import random

    from protocol.encoding import decode
    from protocol.errors import LocalProtocolError
    from protocol.evidence import arbiter_ruling, verify_bundle
    from protocol.messages import Heartbeat, digest
    from tests.protocol.arbitration_vectors import T0, agreement, forged, served_bundle

    rng = random.Random(99)
    bases = [(a, served_bundle(a, upto)) for a, upto in
             ((agreement(60), 120), (agreement(60), 300), (agreement(0, seed=6), 200), (agreement(0, seed=6), 590))]
    items, want, codes = [], [], set()
    for _ in range(160):
        a, base = rng.choice(bases)
        hbs, rcs = list(base.heartbeats), list(base.receipts)
        for _ in range(rng.choice((0, 0, 1, 3))):  # drop records
            pool = hbs if rng.random() < 0.5 else rcs
            if pool:
                pool.pop(rng.randrange(len(pool)))
        for _ in range(rng.choice((0, 0, 1, 1, 2))):  # the provider re-signs a heartbeat changed
            # (often one of the last: which one is kept decides stopped_early)
            pick = rng.choice(base.heartbeats[-3:] if rng.random() < 0.5 else base.heartbeats)
            hb = decode(pick, Heartbeat)
            hb = dataclasses.replace(hb, sent_ms=hb.sent_ms + rng.choice((-60_000, -25_000, -1, 1, 3_000, 30_000)),
                                     prev_hash=rng.choice((hb.prev_hash, hb.prev_hash, bytes(32))))
            hbs.append(hb.sign(a.provider).encode())
        if rng.random() < 0.05:
            hbs.append(b"\x93\x14\x01\x00")
        hashes = [digest(h) for h in base.heartbeats]
        notices = []
        for _ in range(rng.choice((0, 1, 1, 1, 2, 3))):
            sent = T0 + rng.randrange(-10_000, 620_000, 500)
            stop = sent + rng.choice((-1, 0, 20_000, 59_999, 60_000, 60_001, 120_000, rng.randrange(0, 700_000)))
            after = rng.choice(hashes + [bytes(32)])
            notices.append(forged(a, sent, stop, after).encode())
        bundle = dataclasses.replace(base, heartbeats=tuple(sorted(set(hbs))), receipts=tuple(sorted(set(rcs))),
                                     notices=tuple(sorted(set(notices))))
        if rng.random() < 0.15:  # terms at an edge of their validity (step 1)
            t = bundle.terms
            change = rng.choice(({"renter": t.provider}, {"renter": bytes(20)}, {"provider": bytes(20)},
                                 {"price_per_second": 0}, {"max_seconds": 0}, {"heartbeat_interval": 0},
                                 {"dispute_window": 0}, {"arbiter": bytes(20)}, {"arbiter": t.renter},
                                 {"open_by": 0}, {"grace": 0}, {"price_per_second": 2**255}))
            bundle = dataclasses.replace(bundle, terms=dataclasses.replace(t, **change))
        verdict = verify_bundle(bundle)
        codes.update(i.code for i in verdict.invalid)
        try:
            ruling = arbiter_ruling(bundle).to_json_dict()
            want.append({"claim_provider_amount": verdict.payout.to_json()["provider"],
                         "notice_faults": list(verdict.notice_faults), "ruling": ruling})
        except LocalProtocolError as exc:
            want.append(exc.code)
        items.append({"op": "ruling", "hex": bundle.encode().hex()})
    got = _oracle(items)
    diffs = [(w, g) for w, g in zip(want, got) if w != g]
    assert not diffs, f"{len(diffs)} of {len(items)} differ, first: {diffs[:2]}"
    faults = {f for w in want if isinstance(w, dict) for f in w["notice_faults"]}
    assert faults == {"notice_on_demand", "short_notice", "notice_backdated", "stopped_early"}, faults
    assert {"equivocation", "broken_chain", "time_went_back", "bad_stop", "bad_field", "bad_terms"} <= codes, codes
    assert "bad_terms" in want  # no ruling
