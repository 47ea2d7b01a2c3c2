"""The power price sources and the curtailment rule (node/power.py): schedules, an HTTP feed
served on 127.0.0.1 by the test, hysteresis, and bad feeds that change nothing."""

import json
import threading
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import trio

from node.power import (CurtailmentRule, HttpPrice, PowerFeedError, PowerWatch, PricePoint,
                        SchedulePrice, parse_csv, parse_json, price_source)

D = Decimal


def test_rule__hysteresis_does_not_flap():
    rule = CurtailmentRule(D(200), D(100))
    seq = [50, 199, 201, 150, 250, 101, 99, 150, 199, 200.5]
    assert [rule.update(D(str(p))) for p in seq] == [
        None, None, "curtail", None, None, None, "resume", None, None, "curtail"]
    with pytest.raises(ValueError):
        CurtailmentRule(D(100), D(100))


def test_schedule__csv_and_json_give_the_price_in_force(tmp_path):
    csv_file = tmp_path / "ercot.csv"
    csv_file.write_text("# hub prices\ntimestamp,price_per_mwh,node\n1000,25.5,HB\n"
                        "2026-12-03T14:00:00Z,-3,HB\n2000,900,HB\n")
    s = SchedulePrice.load(csv_file)
    assert trio.run(s.price, 999) is None
    assert trio.run(s.price, 1500) == PricePoint(1000, D("25.5"))
    assert trio.run(s.price, 2000) == PricePoint(2000, D(900))
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps([{"timestamp": 10, "price_per_mwh": "41.2"}]))
    assert trio.run(price_source(str(json_file)).price, 11).per_mwh == D("41.2")


@pytest.mark.parametrize("text, where", [
    ("time,price\n1,2\n", "header"),
    ("timestamp,price_per_mwh\nyesterday,2\n", "timestamp"),
    ("timestamp,price_per_mwh\n2026-01-01T00:00:00,2\n", "time zone"),
    ("timestamp,price_per_mwh\n1,lots\n", "not a number"),
    ("timestamp,price_per_mwh\n1,NaN\n", "out of range"),
    ("timestamp,price_per_mwh\n1,1e30\n", "out of range"),
])
def test_schedule__bad_rows_say_what_and_where(text, where):
    with pytest.raises(PowerFeedError) as err:
        parse_csv(text, "s.csv")
    assert where in str(err.value)


@pytest.mark.parametrize("text", ['{"timestamp": 1}', "[1, 2]", "{", '{"timestamp": true, "price_per_mwh": 1}',
                                  "[" * 100_000])
def test_feed__malformed_json_is_a_feed_error(text):
    with pytest.raises(PowerFeedError):
        parse_json(text)


class _Feed(BaseHTTPRequestHandler):
    body = b"{}"

    def do_GET(self):  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(type(self).body)

    def log_message(self, *args):
        pass


@pytest.fixture
def feed():
    handler = type("Feed", (_Feed,), {})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}/price"
    server.shutdown()
    server.server_close()


async def test_watch__http_feed_crossing_the_thresholds_curtails_then_resumes(feed):
    handler, url = feed
    calls = []

    async def curtail(p):
        calls.append(("curtail", p.per_mwh))

    async def resume(p):
        calls.append(("resume", p.per_mwh))

    watch = PowerWatch(HttpPrice(url, timeout_s=2), CurtailmentRule(D(300), D(150)), 1.0,
                       lambda: 10_000, curtail, resume)
    for price in ("120", "310.5", "200", "garbage", "149"):
        handler.body = json.dumps({"timestamp": 9_999, "price_per_mwh": price}).encode()
        await watch.poll_once()
    assert calls == [("curtail", D("310.5")), ("resume", D(149))]
    assert watch.errors == 1 and "not a number" in watch.last_error
    # A feed that does not answer is an error too, and the state stays.
    dead = PowerWatch(HttpPrice("http://127.0.0.1:9/none", timeout_s=1), CurtailmentRule(D(3), D(1)),
                      1.0, lambda: 0, curtail, resume)
    assert await dead.poll_once() is None and dead.errors == 1 and not dead.rule.curtailed
