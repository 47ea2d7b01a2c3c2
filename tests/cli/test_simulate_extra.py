"""`gpumarket simulate` comes from the simulator's entry point; without the `sim` extra
(numpy, numba, matplotlib) it says in one sentence what to install and exits 2."""

import sys

import pytest

from node import cli as node_cli
from simulations import cli as sim_cli

STALE = ("no `gpumarket.commands` entry point for simulate: the installed metadata predates "
         "pyproject.toml's entry point; reinstall with pip install -e '.[test]'")


def _simulate_parser():
    parser = node_cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices.get("simulate")


def test_simulate__registered_through_entry_point_with_extra_installed():
    assert _simulate_parser() is not None, STALE
    args = node_cli.build_parser().parse_args(["simulate", "s.toml", "--out", "o", "--seed", "3"])
    assert args.func is sim_cli.dispatch and args.seed == 3 and args.target == ["s.toml"]


@pytest.mark.parametrize("absent", ["numba", "numpy", "matplotlib"])
@pytest.mark.parametrize("argv", [["simulate", "s.toml", "--out", "o"], ["simulate", "plot", "o"],
                                  ["simulate", "--help"], ["simulate"]])
def test_simulate__without_extra_says_what_to_install_and_exits_2(monkeypatch, capsys, tmp_path,
                                                                   absent, argv):
    assert _simulate_parser() is not None, STALE
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, absent, None)  # importlib.util.find_spec now says: absent
    assert node_cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.strip() == ("gpumarket: the simulator needs its extra dependencies: "
                           f"pip install 'gpumarket[sim]' (missing: {absent})")
    assert not (tmp_path / "o").exists()


def test_python_m_simulations__without_extra_exits_2(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "numpy", None)
    assert sim_cli.main(["s.toml", "--out", "o"]) == 2
    assert "pip install 'gpumarket[sim]'" in capsys.readouterr().err


def test_other_commands__unaffected_without_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)
    args = node_cli.build_parser().parse_args(["offers", "search", "gpu=RTX_4090"])
    assert args.command == "offers"
