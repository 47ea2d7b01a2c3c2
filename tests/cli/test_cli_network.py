"""A network to join (issue 17): the escrow at one computed address on every chain through the
deterministic deployment proxy, `gpumarket escrow deploy` (idempotent), chain.escrow optional,
`init --network NAME` from the shipped networks file, and the devnet's dialable addresses,
export lines and faucet."""

import json
import signal

import pytest
import rlp
from eth_account import Account

from node.anvil import AnvilProcess, find_anvil
from node.chain import Chain, _cs
from node.deterministic import (PROXY_ADDRESS, PROXY_DEPLOYMENT_TX, PROXY_SIGNER, deploy_escrow,
                                escrow_address)
from node.wallet import Wallet
from protocol.eth import keccak

from .harness import gm, start_devnet, start_node, stop

needs_anvil = pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (.ci/run installs it)")


def test_deterministic__the_presigned_proxy_transaction_is_what_it_claims():
    """The constant, checked from its bytes: the signer it recovers to, and the address that
    signer's first (nonce 0) creation gets."""
    signer = Account.recover_transaction(PROXY_DEPLOYMENT_TX)
    assert bytes.fromhex(signer[2:]) == PROXY_SIGNER
    nonce, gas_price, gas, to, value, data, v, r, s = rlp.decode(PROXY_DEPLOYMENT_TX)
    assert to == b"" and v == b"\x1b"  # a creation, without a chain id (valid on any chain)
    assert keccak(rlp.encode([PROXY_SIGNER, 0]))[12:] == PROXY_ADDRESS


@needs_anvil
def test_deterministic__same_escrow_address_on_two_chains_and_deploy_is_idempotent(tmp_path):
    # anvil without its built-in copy of the proxy: the presigned transaction deploys it
    with AnvilProcess(extra_args=("--disable-default-create2-deployer",)) as anvil:
        payer = Wallet.from_key(b"\x07" * 32)
        anvil.fund(payer.address, 10**20)
        chain = Chain.connect(anvil.url)
        assert not chain.w3.eth.get_code(_cs(PROXY_ADDRESS))
        key_file = tmp_path / "key.hex"
        key_file.write_text(payer.key.hex())
        out = gm(tmp_path / "n", "escrow", "deploy", "--rpc", anvil.url, "--key-file", str(key_file), "--json")
        assert out.returncode == 0, out.stderr
        first = json.loads(out.stdout)
        assert first["deployed"] and first["proxy_deployed"] and first["gas_used"] > 100_000
        assert first["escrow"] == "0x" + escrow_address().hex()
        assert chain.w3.eth.get_code(_cs(escrow_address()))
        out = gm(tmp_path / "n", "escrow", "deploy", "--rpc", anvil.url, "--key-file", str(key_file))
        assert out.returncode == 0 and "already at 0x" + escrow_address().hex() in out.stdout
        assert "nothing sent" in out.stdout
    # another chain (another chain id): the same address
    embedded = Chain.embedded()
    assert embedded.chain_id != 31337
    assert deploy_escrow(embedded, embedded.dev_keys()[0]).address == escrow_address()
    out = gm(tmp_path / "n", "escrow", "address")
    assert out.stdout.strip() == "0x" + escrow_address().hex()


@needs_anvil
def test_network__init_network_and_a_computed_escrow(tmp_path):
    d = tmp_path / "n"
    out = gm(d, "init", "--network", "nope")
    assert out.returncode == 2 and "unknown network 'nope'; known:" in out.stderr
    assert not d.exists()  # nothing was created for a wrong name
    out = gm(d, "init", "--network", "base-sepolia")
    assert out.returncode == 0, out.stderr
    text = (d / "config.toml").read_text()
    assert 'rpc = "https://sepolia.base.org"' in text and "chain_id = 84532" in text
    assert '0x036CbD53842c5426634e7929541eC2318f3dCF7e' in text and "escrow =" not in text
    with AnvilProcess() as anvil:
        cfg = d / "config.toml"
        cfg.write_text(text.replace("https://sepolia.base.org", anvil.url).replace("chain_id = 84532", "chain_id = 31337")
                       .replace('token = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"', "#")
                       .replace('listen = ["/ip4/0.0.0.0/tcp/4001"]', 'listen = ["/ip4/127.0.0.1/tcp/0"]'))
        wallet = bytes.fromhex(json.loads((d / "wallet.json").read_text())["address"])
        anvil.fund(wallet, 10**20)
        out = gm(d, "node", "run", timeout=60)
        assert out.returncode == 4, out.stderr[-2000:]
        assert f"no escrow at its computed address 0x{escrow_address().hex()}" in out.stderr
        assert f"gpumarket escrow deploy --rpc {anvil.url}" in out.stderr
        out = gm(d, "escrow", "deploy", "--rpc", anvil.url)  # paid by the node's own wallet
        assert out.returncode == 0 and "deployed the escrow at 0x" + escrow_address().hex() in out.stdout, out.stderr
        proc, _ = start_node(d)
        try:
            status = json.loads(gm(d, "status", "--json").stdout)
            assert status["escrow"] == "0x" + escrow_address().hex() and status["escrow_is_computed"]
            assert status["bootstrap"] == []
            native = json.loads(gm(d, "balance", "--json").stdout)["native"]
            assert 99 < float(native) < 100  # 100 ETH funded, less the deployment's gas
        finally:
            stop(proc)


@needs_anvil
def test_devnet__prints_dialable_addresses_export_lines_and_funds_a_wallet(tmp_path):
    proc, lines = start_devnet(tmp_path, providers=1, renters=1)
    try:
        text = "".join(lines)
        assert "devnet ready" in text, text
        assert f"escrow 0x{escrow_address().hex()}" in text
        addrs = [l.split()[-1] for l in lines if l.strip().startswith("/ip4/127.0.0.1/tcp/")]
        assert len(addrs) == 2 and all("/p2p/12D3KooW" in a for a in addrs)
        assert f"export GPUMARKET_HOME={tmp_path / 'renter-0'}" in text
        assert "bootstrap = [\"" + addrs[0] + "\"]" in text
        me = Wallet.from_key(b"\x09" * 32)
        out = gm(tmp_path, "devnet", "faucet", "0x" + me.address.hex(), "--dir", str(tmp_path), "--json")
        assert out.returncode == 0, out.stderr
        doc = json.loads(out.stdout)
        assert doc["tUSDC_balance"] == 1000 and doc["eth"] == 10
        out = gm(tmp_path, "devnet", "faucet", "0x1234", "--dir", str(tmp_path))
        assert out.returncode == 2 and "not a 0x-prefixed 20-byte address" in out.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    out = gm(tmp_path, "devnet", "faucet", "0x" + "11" * 20, "--dir", str(tmp_path))
    assert out.returncode == 3 and "no devnet is running" in out.stderr
