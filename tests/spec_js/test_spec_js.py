"""The second implementer: tests/spec_js/ is a JavaScript implementation of the wire protocol written
from specs/ alone (encoding and decoding of every message, the decoding error codes, message ids,
signatures, the agreement id and EIP-712 digests, wallet bindings, offer validation verdicts, the
text rule, exec frames, the offer book's admission and ranking). This runs it over every file in
specs/vectors/ and fails on any mismatch, so a vector, or a spec rule the JS code was written from,
that drifts from what protocol/ does shows up here. Needs ``node`` and the @noble packages that
.ci/run installs into tests/interop/node_modules (``npm ci --prefix tests/interop``); skipped with
that reason only when they are absent."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
ROOT = HERE.parent.parent
VECTORS = ROOT / "specs" / "vectors"
RUNNER = HERE / "run_vectors.mjs"
NODE = shutil.which("node")
NOBLE = HERE.parent / "interop" / "node_modules" / "@noble"


def _missing() -> str | None:
    if NODE is None:
        return "node (Node.js) is not installed"
    for package in ("curves", "hashes"):
        if not (NOBLE / package / "package.json").is_file():
            return f"npm package @noble/{package} is not installed in tests/interop (see .ci/run)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=_missing() or "")


def _run(vectors: Path) -> tuple[int, dict]:
    done = subprocess.run([NODE, str(RUNNER), "--json"], capture_output=True, text=True, timeout=120,
                          env={"SPEC_VECTORS_DIR": str(vectors), "PATH": "/usr/bin:/bin"})
    assert done.stdout.strip(), f"runner printed nothing; stderr:\n{done.stderr}"
    return done.returncode, json.loads(done.stdout)


def test_js_implementation_agrees_with_every_vector() -> None:
    rc, results = _run(VECTORS)
    files = sorted(p.name for p in VECTORS.glob("*.json"))
    assert sorted(results) == files, "the JS runner must check every vector file"
    failures = [f"{name}: {line}" for name, r in results.items() for line in r["failures"]]
    assert not failures, "\n".join(failures)
    assert rc == 0
    for name, r in results.items():
        assert r["pass"] > 0, name


def test_runner_reports_a_corrupted_vector(tmp_path: Path) -> None:
    """The check can fail: one flipped signature byte in wire.json and one changed decoding code."""
    for path in VECTORS.iterdir():
        shutil.copy(path, tmp_path / path.name)
    wire = json.loads((VECTORS / "wire.json").read_text())
    first = wire["valid"][0]
    first["wire_hex"] = first["wire_hex"][:-2] + ("00" if first["wire_hex"][-2:] != "00" else "01")
    (tmp_path / "wire.json").write_text(json.dumps(wire))
    decoding = json.loads((VECTORS / "decoding.json").read_text())
    case = next(c for c in decoding["cases"] if c["code"] == "truncated")
    case["code"] = "malformed"
    (tmp_path / "decoding.json").write_text(json.dumps(decoding))
    rc, results = _run(tmp_path)
    assert rc == 1
    assert results["wire.json"]["fail"] >= 1
    assert any(case["name"] in line for line in results["decoding.json"]["failures"])
    assert results["binding.json"]["fail"] == 0
