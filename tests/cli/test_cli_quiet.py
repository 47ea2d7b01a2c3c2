"""A quiet terminal and early, named errors (issue 17): py-libp2p's loggers go to the node log,
not the terminal; no ResourceWarning at exit; config multiaddrs checked at load with the key's
name; a wrong keystore password says so."""

import json
import signal

import pytest


from .harness import ENV, gm, init, search, start_node, stop, wait_for


def test_quiet__libp2p_chatter_goes_to_the_node_log_not_the_terminal(market):
    prov, rent, p_proc = market
    offer = wait_for(lambda: search(rent), 30, "the provider's offer at the renter")[0]
    p_proc.send_signal(signal.SIGKILL)  # dies without withdrawing: the renter dials a dead peer
    p_proc.wait(timeout=30)
    out = gm(rent, "rent", offer["offer_id"], "--hours", "1", "--yes")
    assert out.returncode == 1, out.stdout + out.stderr
    terminal = (rent / "stderr.log").read_text()
    log = (rent / "node.log").read_text()
    assert "Failed to open TCP stream" not in terminal and " libp2p." not in terminal, terminal[-3000:]
    assert "libp2p.transport.tcp.tcp: Failed to open TCP stream" in log  # kept there, named
    assert "renter up" in terminal and "renter up" in log  # our own lines go to both


def test_quiet__no_resource_warning_at_exit(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    init(a, provider=False)
    init(b, provider=False)
    a_proc, a_ready = start_node(a)
    b_proc, _ = start_node(b, "--bootstrap", a_ready["addrs"][0])
    wait_for(lambda: json.loads(gm(b, "status", "--json").stdout)["peers"] >= 1, 30, "a connection")
    stop(b_proc)
    stop(a_proc)
    for d in (a, b):
        text = (d / "stderr.log").read_text()
        assert "ResourceWarning" not in text and "unclosed" not in text, text[-2000:]


@pytest.mark.parametrize("key, value, says", [
    ("listen", '["1.2.3.4:4001"]', "node.listen: '1.2.3.4:4001' is not a multiaddr"),
    ("listen", '["/ip4/999.1.1.1/tcp/1"]', "node.listen: '/ip4/999.1.1.1/tcp/1' is not a multiaddr"),
    ("bootstrap", '["/ip4/127.0.0.1/tcp/4001"]', "node.bootstrap: '/ip4/127.0.0.1/tcp/4001' does not end in /p2p/"),
    ("announce", '["/ip4/1.2.3.4/tcp/x"]', "node.announce: '/ip4/1.2.3.4/tcp/x' is not a multiaddr"),
])
def test_quiet__config_multiaddrs_are_checked_at_load_with_the_key(tmp_path, key, value, says):
    d = tmp_path / "n"
    init(d, provider=False)
    cfg = d / "config.toml"
    text = cfg.read_text()
    if key == "announce":
        text = text.replace("[chain]", f"announce = {value}\n[chain]", 1).replace("# announce", "#")
    else:
        text = "\n".join(f"{key} = {value}" if line.startswith(f"{key} = ") else line
                         for line in text.splitlines())
    cfg.write_text(text)
    out = gm(d, "node", "run")
    assert out.returncode == 2 and says in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


def test_quiet__bad_listen_flag_is_named(tmp_path):
    d = tmp_path / "n"
    init(d, provider=False)
    out = gm(d, "node", "run", "--listen", "tcp:4001")
    assert out.returncode == 2 and "--listen: 'tcp:4001' is not a multiaddr" in out.stderr


def test_quiet__wrong_password_says_wrong_password(tmp_path):
    d = tmp_path / "n"
    init(d, provider=False)
    out = gm(d, "node", "run", env={**ENV, "GPUMARKET_PASSWORD": "not it"})
    assert out.returncode == 1
    assert "wrong password for the wallet keystore" in out.stderr and "MAC" not in out.stderr
