"""The renter's terminal (issue 17): arguments checked before anything is signed or sent, in
hours and per GPU-hour; money with its unit and token; `balance`; search by a model's leading
words and `--sort -price`; `--json` on stdout with errors as JSON and documented exit codes."""

import json
import signal
import subprocess
import time

import pytest

from .harness import ENV, EXE, gm, search, wait_for


@pytest.mark.parametrize("args, says", [
    (["--hours", "0"], "--hours 0: must be more than 0"),
    (["--hours", "-1"], "--hours -1: must be more than 0"),
    (["--hours", "abc"], "--hours 'abc' is not a number"),
    (["--seconds", "0"], "--seconds 0: a rental lasts at least one second"),
    (["--hours", "1", "--gpus", "0"], "--gpus 0: rent at least 1 GPU"),
    (["--hours", "1", "--gpus", "-2"], "--gpus -2: rent at least 1 GPU"),
    (["--hours", "1", "--max-price", "abc"], "--max-price 'abc' is not a number"),
    (["--hours", "1", "--max-price", "0"], "--max-price 0: must be more than 0"),
])
def test_renter__arguments_are_checked_before_the_node_is_asked(tmp_path, args, says):
    # no node runs here: a usage error (2), not "no node is running" (3), proves the order
    out = gm(tmp_path / "nobody", "rent", "abcdef", *args, "--yes")
    assert out.returncode == 2 and says in out.stderr, out.stderr


def test_renter__limits_money_search_and_json(market):
    prov, rent, _ = market
    row = wait_for(lambda: search(rent), 30, "the provider's offer at the renter")[0]
    oid = row["offer_id"]
    # the offer's own limits, in hours and GPUs, before anything is signed or sent
    out = gm(rent, "rent", oid, "--hours", "0.001", "--yes")
    assert out.returncode == 2, out.stderr
    assert "--hours 0.001 is outside this offer's rental length of 0.17 to 168 hours" in out.stderr
    out = gm(rent, "rent", oid, "--hours", "1", "--gpus", "3", "--yes")
    assert out.returncode == 2 and f"--gpus 3: offer {oid} has 2 GPUs free" in out.stderr
    out = gm(rent, "rent", oid, "--hours", "1", "--max-price", "0.1", "--yes")
    assert out.returncode == 2 and ("--max-price 0.1 tUSDC per GPU-hour is below this offer's price "
                                    f"of {row['price_per_gpu_hour']} tUSDC per GPU-hour") in out.stderr
    assert json.loads(gm(rent, "rentals", "--json").stdout) == []  # nothing was rented

    # search: a model's leading words match its token; the token and duration limits are shown
    assert row["model_token"] == "H100_80GB_HBM3"
    assert (row["min_duration_s"], row["max_duration_s"]) == (600, 7 * 24 * 3600)
    assert [r["offer_id"] for r in search(rent, "gpu=H100")] == [oid]
    assert search(rent, "gpu=H10") == []
    out = gm(rent, "offers", "search", "--sort", "-price", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)[0]["offer_id"] == oid, out.stderr
    out = gm(rent, "offers", "search", "gpu=H100")
    assert "H100_80GB_HBM3" in out.stdout and "0.17-168" in out.stdout

    # money with unit and token
    bal = json.loads(gm(rent, "balance", "--json").stdout)
    assert bal["token"] == "tUSDC" and bal["balance"] == "10000" and bal["native_unit"] == "ETH"
    out = gm(rent, "balance")
    assert out.returncode == 0 and "10000 tUSDC" in out.stdout
    status = gm(prov, "status")
    assert "10000 tUSDC" in status.stdout and "dialable:" in status.stdout
    assert "bootstrap:   the list is empty" in status.stdout and "--network" in status.stdout

    # --json: errors are JSON on stdout with the exit code; the human line goes to stderr
    out = gm(rent, "rent", "ffffffffffff", "--hours", "1", "--yes", "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 3 and doc == {"ok": False, "error": doc["error"], "kind": "not_found",
                                           "exit": 3}
    assert "no offer with id" in doc["error"] and "no offer with id" in out.stderr
    out = gm(rent, "rental", "stop", "abcd", "--json")
    assert out.returncode == 3 and json.loads(out.stdout)["kind"] == "not_found"
    out = gm(rent, "offers", "search", "price<=abc", "--json")
    assert out.returncode == 2 and json.loads(out.stdout)["kind"] == "usage"


def test_renter__rentals_watch_redraws_until_ctrl_c(market):
    _, rent, _ = market
    proc = subprocess.Popen([EXE, "--data-dir", str(rent), "rentals", "--watch", "0.2", "--all"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            stdin=subprocess.DEVNULL)
    time.sleep(3)  # several refreshes
    assert proc.poll() is None  # still watching
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "rentals (all recorded)" in out
    out = gm(rent, "rentals", "--watch", "0")
    assert out.returncode == 2 and "must be positive" in out.stderr
