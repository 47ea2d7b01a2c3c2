"""The shipped example access hook honours the hook contract."""

import json
import subprocess
import sys


def run_hook(tmp_path, access_key):
    doc = {"agreement_id": "ab" * 32, "renter_wallet": "0x" + "11" * 20, "renter_peer_id": "12D3",
           "gpus": ["cd" * 32], "max_seconds": 3600, "access_key": access_key}
    return subprocess.run([sys.executable, "-m", "node.hooks.ssh_access", "--host", "gpu1.test",
                           "--user", "rent", "--authorized-keys", str(tmp_path / "ak")],
                          input=json.dumps(doc), capture_output=True, text=True, timeout=30)


def test_ssh_access_hook__grants_a_restricted_key_and_prints_the_command(tmp_path):
    out = run_hook(tmp_path, "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIexample renter@laptop")
    assert out.returncode == 0 and out.stdout.strip() == "ssh -p 22 rent@gpu1.test"
    line = (tmp_path / "ak").read_text()
    assert line.startswith("restrict,") and "gpumarket:abababababababab:until=" in line


def test_ssh_access_hook__refuses_a_key_that_is_not_one(tmp_path):
    out = run_hook(tmp_path, 'ssh-ed25519 AAAA\ncommand="rm -rf /" evil')
    assert out.returncode == 1 and not (tmp_path / "ak").exists()
