"""The gpumarket command end to end: init, two `node run` processes sharing an anvil chain,
search, rent, rentals, stop, escrow status, evidence export and verify, and the errors people
meet. Skipped when anvil is not installed (.ci/run installs it)."""

import json
import re
import signal

import pytest

from node.anvil import AnvilProcess, find_anvil

from .harness import (ENV, anvil_market, configure_for_anvil, gm, start_devnet, start_node, stop,
                      wait_for)

pytestmark = pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (.ci/run installs it)")


def test_cli__provider_and_renter_rent_stop_and_verify(tmp_path):
    with anvil_market(tmp_path) as m:
        prov_dir, rent_dir = m.provider_dir, m.renter_dir
        for d in (prov_dir, rent_dir):
            keystore = json.loads((d / "wallet.json").read_text())
            assert "crypto" in keystore  # encrypted; no plain key anywhere in the data dir
            assert "wallet:" in m.init_stdout[d] and keystore["address"].lower() in m.init_stdout[d].lower()
        # errors people meet, before any node runs
        out = gm(rent_dir, "offers", "search", "gpu=H100*")
        assert out.returncode == 3 and "no node is running" in out.stderr  # not found
        out = gm(rent_dir, "offers", "search", "price<=abc")
        assert out.returncode == 2 and "price" in out.stderr and "column" in out.stderr

        provider, p_ready = start_node(prov_dir)
        renter, r_ready = start_node(rent_dir, "--bootstrap", p_ready["addrs"][0])
        try:
            assert p_ready["provider"] and not r_ready["provider"]

            def offers():
                res = gm(rent_dir, "offers", "search", "gpu=H100*", "--json")
                return json.loads(res.stdout) if res.returncode == 0 else None

            rows = wait_for(offers, 30, "the provider's offer at the renter")
            assert rows[0]["gpus"] == 2 and rows[0]["token"] == "tUSDC"
            # no stablecoins yet: refused before negotiating, with the amounts
            out = gm(rent_dir, "rent", rows[0]["offer_id"], "--seconds", "120", "--yes")
            assert out.returncode == 1 and "not enough funds" in out.stderr, out.stderr
            m.fund_renter(token_units=100 * 10**6)
            out = gm(rent_dir, "rent", rows[0]["offer_id"], "--seconds", "120", "--yes", "--json",
                     "--access-key", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAItest renter@laptop")
            assert out.returncode == 0, out.stdout + out.stderr
            agreement = json.loads(out.stdout)  # --json: stdout is the document alone
            aid = agreement["agreement_id"]
            assert "locks up to" in out.stderr and "tUSDC" in out.stderr
            # the provider's access hook ran and its output reached the renter, signed
            assert agreement["access"] == f"ssh -p 2222 gpu@127.0.0.1  # for renter@laptop {aid[:8]}"

            def receipts():
                res = gm(rent_dir, "rentals", "--json")
                row = [r for r in json.loads(res.stdout) if r["agreement_id"] == aid][0]
                return row if row["receipts"] >= 3 else None

            row = wait_for(receipts, 45, "receipts flowing")
            assert row["role"] == "renter" and row["acked_seconds"] >= 5

            out = gm(rent_dir, "rental", "stop", aid[:12])
            assert out.returncode == 0, out.stderr

            def settled():
                res = gm(rent_dir, "escrow", "status", aid[:12], "--json")
                doc = json.loads(res.stdout)
                return doc if doc["state"] == "final" else None

            status = wait_for(settled, 40, "the provider's claim after the renter's stop")
            assert status["deposit"] > 0

            # the manual on-chain commands explain why a settled escrow cannot be claimed again
            out = gm(prov_dir, "escrow", "claim", aid[:12])
            assert out.returncode == 4 and "agreement is not open" in out.stderr, out.stderr
            out = gm(rent_dir, "escrow", "recover", aid[:12])
            assert out.returncode == 4 and "agreement is not open" in out.stderr, out.stderr

            bundle = tmp_path / "evidence.bin"
            out = gm(rent_dir, "evidence", "export", aid[:12], "-o", str(bundle))
            assert out.returncode == 0, out.stderr
            out = gm(rent_dir, "evidence", "verify", str(bundle), "--json")
            verdict = json.loads(out.stdout)
            assert out.returncode == 0, out.stdout
            assert verdict["acked_seconds"] >= 5 and verdict["valid"] is True
            out = gm(rent_dir, "evidence", "verify", str(bundle))
            assert out.returncode == 0 and out.stdout.splitlines()[0] == "VALID", out.stdout
            out = gm(rent_dir, "evidence", "verify", str(tmp_path))
            assert out.returncode == 2 and "is a directory" in out.stderr
            out = gm(rent_dir, "evidence", "verify", str(tmp_path / "missing.bin"))
            assert out.returncode == 3 and "no such file" in out.stderr

            # history survives a restart: the store lists the agreement and its evidence
            stop(renter)
            renter, _ = start_node(rent_dir, "--bootstrap", p_ready["addrs"][0])
            assert json.loads(gm(rent_dir, "rentals", "--json").stdout) == []  # none this run
            history = json.loads(gm(rent_dir, "rentals", "--all", "--json").stdout)
            past = [r for r in history if r["agreement_id"] == aid]
            assert len(past) == 1 and past[0]["live"] is False and past[0]["token"] == "tUSDC"
            assert past[0]["acked_seconds"] >= 5 and past[0]["elapsed_s"] == past[0]["acked_seconds"]
            assert "tUSDC" in gm(rent_dir, "rentals", "--all").stdout
            again = tmp_path / "evidence-again.bin"
            out = gm(rent_dir, "evidence", "export", aid[:12], "-o", str(again))
            assert out.returncode == 0, out.stderr
            out = gm(rent_dir, "evidence", "verify", str(again), "--json")
            assert out.returncode == 0 and json.loads(out.stdout)["valid"] is True, out.stdout
        finally:
            times = [stop(p) for p in (renter, provider)]
        assert renter.returncode == 0 and provider.returncode == 0
        assert max(times) < 10  # SIGTERM shuts down cleanly within seconds
        # the provider withdrew its offer and closed its store: a second start still works
        assert (prov_dir / "node.db").exists()


def test_cli__corrupt_config_and_unknown_keys_are_one_line_errors(tmp_path):
    d = tmp_path / "n"
    assert gm(d, "init").returncode == 0
    (d / "config.toml").write_text("[node\nbroken")
    out = gm(d, "node", "run")
    assert out.returncode == 2 and "not valid TOML" in out.stderr and "Traceback" not in out.stderr
    (d / "config.toml").write_text("[provider]\nprise_per_gpu_hour = 1\n")
    out = gm(d, "node", "run")
    assert out.returncode == 2 and re.search(r"unknown key 'prise_per_gpu_hour'", out.stderr)


def test_cli__wrong_chain_id_is_refused_before_starting(tmp_path):
    with AnvilProcess() as anvil:
        d = tmp_path / "n"
        assert gm(d, "init").returncode == 0
        configure_for_anvil(d, anvil, b"\x01" * 20, b"\x02" * 20, provider=False)
        text = (d / "config.toml").read_text().replace(f"chain_id = {anvil.chain_id}", "chain_id = 137")
        (d / "config.toml").write_text(text)
        out = gm(d, "node", "run", timeout=60)
        assert out.returncode == 4 and "serves chain 31337, but the configuration says 137" in out.stderr
        (d / "config.toml").write_text(text.replace("chain_id = 137", f"chain_id = {anvil.chain_id}"))
        out = gm(d, "node", "run", timeout=60)
        assert out.returncode == 4 and "no escrow contract at 0x0101" in out.stderr


def test_cli__wrong_password_is_a_clear_error(tmp_path):
    d = tmp_path / "n"
    assert gm(d, "init").returncode == 0
    out = gm(d, "node", "run", env={**ENV, "GPUMARKET_PASSWORD": "wrong"}, timeout=60)
    assert out.returncode == 1 and "wrong password" in out.stderr


def test_cli__devnet_starts_a_chain_and_nodes_that_see_each_other(tmp_path):
    proc, lines = start_devnet(tmp_path, providers=2, renters=1)
    try:
        assert any(l.startswith("devnet ready") for l in lines), "".join(lines)

        def offers():
            res = gm(tmp_path / "renter-0", "offers", "search", "--json")
            return json.loads(res.stdout) if res.returncode == 0 and len(json.loads(res.stdout)) == 2 else None

        env_ok = wait_for(offers, 40, "both providers' offers at the devnet renter")
        assert {r["gpus"] for r in env_ok} == {1, 2}
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=40)
    assert proc.returncode == 0
