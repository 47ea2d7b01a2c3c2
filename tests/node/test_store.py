import hashlib
import os
import pathlib
import random
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import trio

from node.store import MIGRATIONS, Store, StoreError

ROOT = pathlib.Path(__file__).resolve().parents[2]
WRITER = pathlib.Path(__file__).with_name("_store_crash_writer.py")
AG = b"\x01" * 32


@pytest.fixture
async def store(tmp_path):
    s = await Store.open(tmp_path / "node.db")
    try:
        yield s
    finally:
        await s.close()


async def test_store__new_db_is_wal_at_latest_schema(tmp_path):
    path = tmp_path / "node.db"
    async with await Store.open(path) as s:
        assert await s.schema_version() == len(MIGRATIONS)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"offers_seen", "peers", "agreements", "heartbeats", "receipts", "evidence",
            "reputation", "counters", "rental_receipts"} <= tables
    conn.close()
    async with await Store.open(path) as s:  # reopening applies nothing and keeps the version
        assert await s.schema_version() == len(MIGRATIONS)


async def test_store__refuses_a_newer_schema(tmp_path):
    path = tmp_path / "node.db"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={len(MIGRATIONS) + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer"):
        await Store.open(path)


async def test_store__failed_migration_leaves_the_old_version(tmp_path, monkeypatch):
    path = tmp_path / "node.db"
    async with await Store.open(path):
        pass
    monkeypatch.setattr("node.store.MIGRATIONS", MIGRATIONS + [["CREATE TABLE t2 (x)", "SYNTAX ERROR"]])
    with pytest.raises(sqlite3.OperationalError):
        await Store.open(path)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name='t2'").fetchone()[0] == 0
    conn.close()


async def test_store__offers_dedupe_and_expire(store):
    assert await store.put_offer(b"P" * 32, 1, b"d1", b"raw1", 100.0, 200.0)
    assert not await store.put_offer(b"P" * 32, 1, b"d1x", b"other", 101.0, 300.0)  # first kept
    assert (await store.get_offer(b"P" * 32, 1)).raw == b"raw1"
    assert await store.put_offer(b"P" * 32, 2, b"d2", b"raw2", 150.0, 400.0)
    assert await store.put_offer(b"Q" * 32, 7, b"d7", b"raw7", 150.0, 180.0)
    live = await store.live_offers(now=190.0)
    assert [(o.provider_key[:1], o.seq) for o in live] == [(b"P", 2)]
    assert await store.prune_expired_offers(now=250.0) == 2
    assert await store.get_offer(b"P" * 32, 1) is None


async def test_store__put_offers_keeps_each_providers_newest_and_deletes_what_the_book_dropped(store):
    rows = [(b"P" * 32, seq, b"d", b"x" * 100, 100.0, 1000.0 + seq) for seq in range(1, 6)]
    rows += [(b"Q" * 32, 1, b"d", b"y" * 100, 100.0, 150.0)]  # expires at 150
    rows += [(b"R" * 32, 3, b"d", b"z" * 100, 100.0, 900.0)]
    assert await store.put_offers(rows[:3]) == 3
    assert await store.put_offers(rows[3:]) == 4
    assert await store.offer_rows() == (3, 300)  # P 1..4 superseded as they were replaced
    assert await store.put_offers([(b"P" * 32, 2, b"d", b"old", 100.0, 1002.0)]) == 1
    assert [o.seq for o in await store.offers_of(b"P" * 32)] == [2, 5]  # an older one is kept
    await store.delete_offers_upto([(b"P" * 32, 2)])
    assert await store.prune_expired_offers(now=200.0) == 1  # Q
    assert await store.delete_offers_upto([(b"R" * 32, 3), (b"P" * 32, 4)]) == 1  # R evicted
    assert [(o.provider_key[:1], o.seq) for o in await store.live_offers(now=200.0)] == [(b"P", 5)]
    assert await store.offer_rows() == (1, 100)


async def test_store__agreements_heartbeats_receipts(store):
    await store.put_agreement(AG, "renter", "proposed", b"terms-bytes", 10.0)
    with pytest.raises(sqlite3.IntegrityError):
        await store.put_agreement(AG, "renter", "proposed", b"again", 11.0)
    with pytest.raises(sqlite3.IntegrityError):
        await store.put_agreement(b"\x02" * 32, "landlord", "proposed", b"t", 11.0)
    await store.set_agreement_state(AG, "active", 12.0)
    row = await store.get_agreement(AG)
    assert (row.state, row.terms, row.created_at, row.updated_at) == ("active", b"terms-bytes", 10.0, 12.0)
    with pytest.raises(KeyError):
        await store.set_agreement_state(b"\x09" * 32, "active", 12.0)
    assert [a.id for a in await store.agreements_in_state("active")] == [AG]

    for seq in (2, 1, 3):
        raw = b"hb%d" % seq
        assert await store.put_heartbeat(AG, seq, raw, hashlib.sha256(raw).digest(), 20.0 + seq)
    assert not await store.put_heartbeat(AG, 2, b"dup", b"h", 30.0)
    assert [h.seq for h in await store.heartbeats(AG)] == [1, 2, 3]
    assert (await store.last_heartbeat(AG)).raw == b"hb3"
    with pytest.raises(sqlite3.IntegrityError):  # foreign key: no heartbeats for unknown agreements
        await store.put_heartbeat(b"\x07" * 32, 1, b"x", b"h", 1.0)

    assert await store.put_receipt(AG, 60, b"r60", 61.0)
    assert await store.put_receipt(AG, 120, b"r120", 121.0)
    assert (await store.latest_receipt(AG)).raw == b"r120"
    assert [r.acked_seconds for r in await store.receipts(AG)] == [60, 120]


async def test_store__peers_evidence_reputation_counters(store):
    await store.upsert_peer("12D3KooA", ["/ip4/1.2.3.4/tcp/1"], 5.0)
    await store.upsert_peer("12D3KooA", ["/ip4/1.2.3.4/tcp/2", "/ip4/5.6.7.8/tcp/2"], 9.0)
    assert await store.peers() == [("12D3KooA", ["/ip4/1.2.3.4/tcp/2", "/ip4/5.6.7.8/tcp/2"], 5.0, 9.0)]
    await store.add_evidence(b"K", "double-offer", b"e1", 1.0)
    await store.add_evidence(b"K", "bad-heartbeat", b"e2", 2.0)
    assert await store.evidence(b"K") == [("double-offer", b"e1", 1.0), ("bad-heartbeat", b"e2", 2.0)]
    assert await store.reputation(b"K") == 0.0
    await store.adjust_reputation(b"K", -2.5, 3.0)
    await store.adjust_reputation(b"K", 1.0, 4.0)
    assert await store.reputation(b"K") == -1.5
    assert await store.increment_counter("offers_rejected") == 1
    assert await store.increment_counter("offers_rejected", 4) == 5
    assert await store.counter("offers_rejected") == 5
    assert await store.counter("never") == 0


async def test_store__concurrent_callers_are_serialised(store):
    await store.put_agreement(AG, "provider", "active", b"t", 0.0)

    async def writer(base):
        for i in range(20):
            await store.put_heartbeat(AG, base + i, b"x", b"h", 0.0)
            await store.increment_counter("n")

    async with trio.open_nursery() as nursery:
        for k in range(5):
            nursery.start_soon(writer, k * 100)
    assert len(await store.heartbeats(AG)) == 100
    assert await store.counter("n") == 100


def _parse_committed(stdout: str):
    hbs, rcs = {}, {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue  # "ready", or a line cut short by the kill
        kind, key, raw = parts
        try:
            value = bytes.fromhex(raw)
        except ValueError:
            continue
        (hbs if kind == "hb" else rcs)[int(key)] = value
    return hbs, rcs


@pytest.mark.slow
async def test_store__sigkill_at_random_moments_loses_no_reported_commit(tmp_path):
    path = tmp_path / "crash.db"
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    all_hbs, all_rcs = {}, {}
    start = 1
    for _round in range(4):
        proc = subprocess.Popen(
            [sys.executable, str(WRITER), str(path), str(start)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 0.6))
            proc.send_signal(signal.SIGKILL)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL, err
        hbs, rcs = _parse_committed(out)
        assert hbs, f"the writer reported no commit before the kill: {err}"
        all_hbs.update(hbs)
        all_rcs.update(rcs)

        async with await Store.open(path) as s:
            assert await s.integrity_check() == "ok"
            stored = {h.seq: h for h in await s.heartbeats(b"A" * 32)}
            for seq, raw in all_hbs.items():
                assert stored[seq].raw == raw
                assert stored[seq].hash == hashlib.sha256(raw).digest()
            receipts = {r.acked_seconds: r.raw for r in await s.receipts(b"A" * 32)}
            for acked, raw in all_rcs.items():
                assert receipts[acked] == raw
            # only the one write in flight at each kill may be stored without being reported
            assert len(stored) - len(all_hbs) <= _round + 1
            start = max(stored) + 1


async def test_store__rental_receipts_keep_every_heartbeat_answer_even_at_equal_acked(tmp_path):
    async with await Store.open(tmp_path / "node.db") as s:
        await s.put_agreement(AG, "renter", "open", b"terms", 1.0)
        assert await s.put_rental_receipt(AG, 0, 0, b"r0", 1.0)
        assert await s.put_rental_receipt(AG, 1, 0, b"r1", 2.0)  # same acked_seconds, later answer
        assert not await s.put_rental_receipt(AG, 1, 0, b"dup", 3.0)
        assert [(q, raw) for q, _, raw, _ in await s.rental_receipts(AG)] == [(0, b"r0"), (1, b"r1")]
        assert [r.raw for r in await s.receipts(AG)] == [b"r0"]  # the claim table as before
