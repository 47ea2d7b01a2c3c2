"""`gpumarket demo` through its real entry point: the README's main job."""

import os
import shutil
import subprocess
import sys


def test_demo__runs_the_whole_market_and_balances_add_up():
    exe = shutil.which("gpumarket") or os.path.join(os.path.dirname(sys.executable), "gpumarket")
    proc = subprocess.run([exe, "demo"], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "COLUMNS": "120"})
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "FAILED" not in out
    for step in ("renter's offer book holds every provider's offer",
                 "recovered its deposit",
                 "provider-a claimed on the renter's last receipt",
                 "every balance changed by exactly the settlement math"):
        assert step in out
    assert "demo complete" in out
