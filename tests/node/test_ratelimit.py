"""node.ratelimit: token buckets and logging that a peer cannot turn into a disk-filling attack."""

import logging

import pytest
import trio

from node.ratelimit import (
    KeyedBuckets,
    PerKeyInterval,
    RateLimitedLog,
    RateLimitFilter,
    TokenBucket,
    take_token,
)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_allows_the_burst_then_the_rate():
    b = TokenBucket(rate=10, burst=5, now=0.0)
    assert [b.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert b.take(0.1) and not b.take(0.1)  # 0.1 s at 10/s: one token
    assert b.full(10.0)


def test_keyed_buckets_are_per_key_and_bounded():
    clock = Clock()
    kb = KeyedBuckets(rate=1, burst=2, max_keys=3, clock=clock)
    assert kb.allow("a") and kb.allow("a") and not kb.allow("a")
    assert kb.allow("b")  # another key has its own bucket
    kb.allow("c")
    kb.allow("d")  # a fourth key: the idle/oldest goes, memory stays bounded
    assert len(kb) <= 3
    clock.t = 100.0
    for k in range(50):
        kb.allow(k)
    assert len(kb) <= 3


def test_per_key_interval__once_per_interval_per_key_and_forget_lets_it_run_at_once():
    iv = PerKeyInterval(300.0)
    assert iv.due("a", 0.0)
    iv.ran("a", 0.0)
    assert not iv.due("a", 299.9) and iv.due("b", 299.9)  # per key
    assert iv.due("a", 300.0)  # the interval is over exactly at its end
    iv.forget("a")
    iv.ran("b", 10.0)
    assert iv.due("a", 10.0) and not iv.due("b", 10.0)
    assert PerKeyInterval(0.0).due("a", 0.0)
    with pytest.raises(ValueError):
        PerKeyInterval(-1.0)


def test_per_key_interval__bounded_keys_whose_interval_is_over_go_first_then_the_oldest():
    iv = PerKeyInterval(100.0, max_keys=3)
    iv.ran("old", 0.0)
    iv.ran("a", 50.0)
    iv.ran("b", 60.0)
    iv.ran("c", 120.0)  # full: "old" (over since 100) goes; a and b still wait
    assert len(iv) == 3 and not iv.due("a", 120.0) and not iv.due("b", 120.0)
    iv.ran("a", 150.1)  # a ran again: it is now the newest, b the oldest
    iv.ran("d", 150.2)  # none is over: the oldest run (b at 60) goes
    assert len(iv) == 3 and iv.due("b", 150.2)
    assert not iv.due("a", 150.2) and not iv.due("c", 150.2) and not iv.due("d", 150.2)
    for k in range(50):
        iv.ran(k, 200.0 + k)
    assert len(iv) == 3


def test_rate_limited_log_writes_the_first_n_then_a_summary(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    rlog = RateLimitedLog(logging.getLogger("test.rlog"), burst=3, interval=60.0, clock=clock)
    for i in range(1000):
        rlog.warning("bad_input", "bad input %d", i)
    assert [r.getMessage() for r in caplog.records] == ["bad input 0", "bad input 1", "bad input 2"]
    rlog.warning("other", "another kind")  # its own budget
    clock.t = 61.0
    caplog.clear()
    rlog.warning("bad_input", "bad input again")
    assert [r.getMessage() for r in caplog.records] == [
        "bad_input: 997 similar messages suppressed in the last 60 s", "bad input again"]


def test_rate_limit_filter_limits_each_call_site_of_a_third_party_logger(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    logger = logging.getLogger("test.thirdparty")
    f = RateLimitFilter(burst=2, interval=60.0, clock=clock)
    logger.addFilter(f)

    def fail(peer):  # one call site, as in py-libp2p
        logger.error(f"peer {peer} failed")  # an f-string: the text differs every time

    try:
        for i in range(100):
            fail(i)
            logger.debug("debug passes %d", i)
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 2
        assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 0  # below caplog's level
        clock.t = 60.0
        fail("x")
        last = [r for r in caplog.records if r.levelno == logging.ERROR][-1]
        assert "98 similar records suppressed" in last.getMessage()
    finally:
        logger.removeFilter(f)


def test_keyed_buckets_report_tokens_without_spending_them():
    clock = Clock()
    kb = KeyedBuckets(rate=10, burst=4, clock=clock)
    assert kb.tokens("new") == 4
    for _ in range(3):
        kb.allow("a")
    assert kb.tokens("a") == 1
    clock.t = 0.2
    assert kb.tokens("a") == 3 and kb.tokens("a") == 3


def test_token_bucket__wait_time_is_the_exact_refill_time_and_never_overfills():
    b = TokenBucket(rate=0.5, burst=2, now=100.0)
    assert b.take(100.0) and b.take(100.0)
    assert not b.take(100.0)
    assert b.wait_time(100.0) == pytest.approx(2.0)
    assert b.wait_time(101.0) == pytest.approx(1.0)
    assert b.take(102.0) and not b.take(102.0)
    assert b.wait_time(200.0) == 0 and b.tokens == 2  # never more than the burst
    assert b.take(150.0) and b.tokens == 1  # a clock that steps back neither refills nor drains
    assert b.wait_time(150.0) == 0 and b.wait_time(200.0) == 0 and b.tokens == 1


async def test_take_token__waits_exactly_the_refill_time_on_trio_time(autojump_clock):
    # autojump: virtual time, so the figure is exact whatever the machine's load
    b = TokenBucket(rate=4, burst=2, now=trio.current_time())
    t0 = trio.current_time()
    for _ in range(5):  # 2 banked, then one every 0.25 s
        await take_token(b)
    assert trio.current_time() - t0 == pytest.approx(0.75)
