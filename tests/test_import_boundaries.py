"""The package layers: protocol/ (the core) imports neither node/ nor simulations/; node/ (a
provider's or renter's node) never imports simulations/, whose numpy, numba and matplotlib are
the optional `sim` extra. The CLI reaches the simulator only through an entry point."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imported_packages(path: pathlib.Path, root: pathlib.Path = ROOT):
    """(line, top-level package) for every import in a file under `root`, relative ones
    resolved (`from .. import simulations` in node/x.py is `simulations`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    # the package the module sits in: node/x.py and node/__init__.py are both in `node`
    package = list(path.relative_to(root).parent.parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module.split(".")[0]
                continue
            base = package[:len(package) - (node.level - 1)]
            names = [node.module] if node.module else [alias.name for alias in node.names]
            for name in names:
                yield node.lineno, (base or [name])[0]


def _offenders(package: str, forbidden: set[str]) -> list[str]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    return [f"{path.relative_to(ROOT)}:{lineno} imports {name}"
            for path in files for lineno, name in _imported_packages(path)
            if name in forbidden]


def test_node__never_imports_simulations():
    assert _offenders("node", {"simulations"}) == []


def test_protocol__imports_neither_node_nor_simulations():
    assert _offenders("protocol", {"node", "simulations"}) == []


def test_import_scan__resolves_relative_imports(tmp_path):
    # The scan itself must see a relative import that climbs out of the package.
    pkg = tmp_path / "node" / "sub"
    pkg.mkdir(parents=True)
    (pkg / "m.py").write_text("from ... import simulations\nfrom ..x import y\nimport numpy.linalg\n"
                              "from . import z\n")
    (pkg / "__init__.py").write_text("from .. import simulations\n")
    assert [name for _, name in _imported_packages(pkg / "m.py", tmp_path)] == [
        "simulations", "node", "numpy", "node"]
    assert [name for _, name in _imported_packages(pkg / "__init__.py", tmp_path)] == ["node"]
    (pkg / "__init__.py").write_text("from ... import simulations\n")
    assert [name for _, name in _imported_packages(pkg / "__init__.py", tmp_path)] == ["simulations"]


def test_node_cli_and_node__load_no_simulator_modules():
    # Transitive: a provider's node and its CLI (parser built, so every command is registered)
    # run without the simulator's dependencies ever being imported.
    code = (
        "import sys\n"
        "import node.cli, node.node\n"
        "node.cli.build_parser()\n"
        "heavy = ('numpy', 'numba', 'matplotlib', 'simulations.world', 'simulations.network',\n"
        "         'simulations.market', 'simulations.runner', 'simulations.plot')\n"
        "print(','.join(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == ""


def test_node_import__loads_no_simulations_package():
    code = ("import sys\nimport node.cli, node.node\n"
            "print(','.join(m for m in sys.modules if m.split('.')[0] in "
            "('simulations', 'numpy', 'numba', 'matplotlib')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == ""
