"""protocol/ must stay free of I/O, clocks and global randomness (see protocol/__init__.py)."""

import ast
import pathlib
import subprocess
import sys

PROTOCOL = pathlib.Path(__file__).resolve().parent.parent / "protocol"
FORBIDDEN = {
    "trio", "libp2p", "sqlite3", "aiosqlite", "time", "random", "socket", "asyncio",
    "threading", "subprocess", "os", "requests", "aiohttp", "urllib", "http",
    "web3", "pynvml",
}


def _imports(path: pathlib.Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def test_protocol__imports_nothing_that_does_io():
    offenders = []
    files = sorted(PROTOCOL.rglob("*.py"))
    assert files, "protocol/ has no modules"
    for path in files:
        for lineno, name in _imports(path):
            if name.split(".")[0] in FORBIDDEN:
                offenders.append(f"{path.name}:{lineno} imports {name}")
    assert offenders == []


def test_protocol__import_does_not_load_io_modules():
    # Transitive check: importing every protocol module must not pull in trio, sqlite3, web3
    # providers or libp2p through a dependency.
    code = (
        "import sys, pkgutil, importlib, protocol\n"
        "for m in pkgutil.iter_modules(protocol.__path__):\n"
        "    importlib.import_module('protocol.' + m.name)\n"
        "bad = [m for m in ('trio', 'sqlite3', 'libp2p', 'web3', 'pynvml', 'asyncio') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
