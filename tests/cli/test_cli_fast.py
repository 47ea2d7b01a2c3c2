"""Commands that talk to a running node import none of the node's heavy dependencies (issue 17:
they took about 3 s each, importing web3, eth-account and libp2p before opening the control
socket). The time itself is measured by tests/benchmarks/bench_cli_latency.py."""

import json
import subprocess
import sys

import pytest


from .harness import ENV, init, start_node, stop

HEAVY = ("trio", "web3", "eth_account", "libp2p", "eth_abi", "nacl", "rich", "numpy")

PROBE = """import json, sys
from node.cli import main
code = main(sys.argv[1:])
heavy = sorted({m.split('.')[0] for m in sys.modules} & set(%r))
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
""" % (HEAVY,)


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fast") / "n"
    init(d, provider=True)
    proc, _ = start_node(d)
    yield d
    stop(proc)


@pytest.mark.parametrize("argv", [["status", "--json"], ["offers", "search", "gpu=H100", "--json"],
                                  ["rentals", "--json"]])
def test_fast__node_commands_import_nothing_heavy(node_dir, argv):
    out = subprocess.run([sys.executable, "-c", PROBE, "--data-dir", str(node_dir), *argv],
                         capture_output=True, text=True, env=ENV, timeout=60, stdin=subprocess.DEVNULL)
    report = json.loads(out.stderr.strip().splitlines()[-1])
    assert report["code"] == 0, out.stderr
    json.loads(out.stdout)  # a real answer from the node
    assert report["heavy"] == [], report
