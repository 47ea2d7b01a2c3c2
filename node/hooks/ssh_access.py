"""Example access hook: grant the renter SSH access with its public key.

The hook contract (the node runs `provider.access_hook` when an agreement opens):
- stdin: one JSON object — agreement_id (hex), renter_wallet, renter_peer_id, gpus (uuid
  digests, hex), max_seconds, access_key (the renter's public key from the negotiation).
- stdout: what the renter needs to reach the GPUs (at most 4096 printable characters); it is sent
  to the renter, signed, over the encrypted libp2p stream, and printed by `gpumarket rent`.
- exit status 0: access granted. Anything else, or no output within 30 s: the node serves nothing
  and claims nothing; the renter's node closes the escrow and recovers its whole deposit.

This example appends the key to an authorized_keys file with a forced command and an expiry
comment, and prints the ssh command line. Configure it as
    access_hook = ["python3", "-m", "node.hooks.ssh_access", "--host", "gpu1.example.net",
                   "--user", "gpurent", "--authorized-keys", "/home/gpurent/.ssh/authorized_keys"]
A real deployment would also create a container limited to the agreed GPUs (CUDA_VISIBLE_DEVICES
or the container runtime's --gpus) and remove the key when the agreement ends.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

KEY_RE = re.compile(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp256) [A-Za-z0-9+/=]+( [^\n]{0,100})?$")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=22)
    parser.add_argument("--user", required=True)
    parser.add_argument("--authorized-keys", required=True, type=Path)
    args = parser.parse_args(argv)
    agreement = json.load(sys.stdin)
    key = str(agreement.get("access_key", "")).strip()
    if not KEY_RE.match(key):
        print("the renter gave no usable SSH public key", file=sys.stderr)
        return 1
    until = int(time.time()) + int(agreement["max_seconds"])
    line = (f'restrict,pty,command="/bin/bash -l" {key} '
            f'gpumarket:{agreement["agreement_id"][:16]}:until={until}\n')
    args.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    with args.authorized_keys.open("a") as f:
        f.write(line)
    print(f"ssh -p {args.port} {args.user}@{args.host}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
