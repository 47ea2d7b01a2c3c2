"""Command line: `python -m simulations SCENARIO.toml --seed N --out DIR [--sweep P=v1,v2]`
and `python -m simulations plot DIR`; `register(subparsers)` adds the same as
`gpumarket simulate ...` and `gpumarket simulate plot DIR`.

A scenario with a `[power]` section is the power-price model's (simulations/spot.py, e.g.
scenarios/spot_power.toml): it runs that model, and `plot DIR` on its results draws its figures."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

from .config import ScenarioError, load


def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="+", metavar="SCENARIO | plot DIR",
                   help="a scenario TOML file to run, or `plot DIR` to draw figures from results")
    p.add_argument("--seed", type=int, default=1, help="the one global seed (default 1)")
    p.add_argument("--out", help="directory for config, metrics, log (required to run)")
    p.add_argument("--sweep", metavar="SECTION.KEY=V1,V2,...", help="one run per value, across cores")
    p.add_argument("--jobs", type=int, default=None, help="processes for --sweep (default: cores)")
    p.add_argument("--cluster", metavar="tcp://SCHEDULER:8786",
                   help="run --sweep on a Dask distributed cluster, one scenario run per task")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=dispatch)


def dispatch(args: argparse.Namespace) -> int:
    if args.target[0] == "plot":
        if len(args.target) != 2:
            print("error: usage: simulate plot DIR", file=sys.stderr)
            return 2
        args.dir = args.target[1]
        return cmd_plot(args)
    if len(args.target) != 1 or not args.out:
        print("error: usage: simulate SCENARIO.toml --out DIR [--seed N] [--sweep P=v1,v2]",
              file=sys.stderr)
        return 2
    args.scenario = args.target[0]
    return cmd_run(args)


def _power_scenario(path: str) -> dict | None:
    """The TOML of a power-price scenario (it has a [power] section), else None."""
    import tomllib
    from pathlib import Path

    try:
        doc = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None  # the network simulator's loader says what is wrong
    return doc if "power" in doc else None


def cmd_run_power(args: argparse.Namespace, doc: dict) -> int:
    """Run the power-price model (simulations/spot.py) on one scenario."""
    from pathlib import Path

    from .spot import SpotScenarioError, run_scenario, write_results

    if args.sweep or args.cluster:
        print("error: --sweep and --cluster run the network simulator's scenarios; a power "
              "scenario runs one seed at a time", file=sys.stderr)
        return 2
    try:
        res = run_scenario(doc, args.seed)
    except SpotScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    write_results(Path(args.out), res)
    print(json.dumps({"scenario": res["config"]["run"]["name"], "seed": args.seed, "model": "power",
                      "net_per_gpu_hour": {p: m["provider_net_per_gpu_hour"]
                                           for p, m in res["metrics"].items()}}, sort_keys=True))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runner import run_scenario, run_sweep

    power = _power_scenario(args.scenario)
    if power is not None:
        return cmd_run_power(args, power)
    try:
        cfg = load(args.scenario)
        if args.sweep:
            rows = run_sweep(cfg, args.seed, args.out, args.sweep, args.jobs, cluster=args.cluster)
            for row in rows:
                print(json.dumps(row, sort_keys=True))
            return 0
        s = run_scenario(cfg, args.seed, args.out, progress=not args.quiet)
    except (ScenarioError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({k: s[k] for k in ("scenario", "seed", "nodes", "events", "rentals_opened",
                                          "match_rate")}, sort_keys=True))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .plot import plot_dir

    if (Path(args.dir) / "curtailment.csv").exists():  # the power-price model's results
        from .spot import plot

        for path in plot(Path(args.dir)):
            print(path)
        return 0
    for path in plot_dir(args.dir):
        print(path)
    return 0


# The third-party packages the simulator needs: the `sim` extra in pyproject.toml.
EXTRA_MODULES = ("numpy", "numba", "matplotlib")
MISSING_EXTRA = "the simulator needs its extra dependencies: pip install 'gpumarket[sim]'"


def missing_modules() -> list[str]:
    """The simulator's dependencies that are not installed (found without importing them)."""
    return [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]


def _missing_extra(args: argparse.Namespace) -> int:
    print(f"gpumarket: {MISSING_EXTRA} (missing: {', '.join(args.missing)})", file=sys.stderr)
    return 2


def register(subparsers) -> None:
    """Add `simulate SCENARIO --out DIR` and `simulate plot DIR` to an argparse subparsers
    object. node/cli.py finds this through the `gpumarket.commands` entry point
    (pyproject.toml). Without the `sim` extra the command only says what to install."""
    missing = missing_modules()
    if missing:
        # takes any arguments, --help included (no prefix characters: every word is positional)
        sim = subparsers.add_parser("simulate", help="the network simulator (needs gpumarket[sim])",
                                    description=MISSING_EXTRA, add_help=False, prefix_chars="\0")
        sim.add_argument("rest", nargs="*")
        sim.set_defaults(func=_missing_extra, missing=missing)
        return
    sim = subparsers.add_parser("simulate", help="run the network simulator on a scenario, or plot results",
                                description=__doc__)
    _add_run_args(sim)


def main(argv: list[str] | None = None) -> int:
    missing = missing_modules()
    if missing:
        return _missing_extra(argparse.Namespace(missing=missing))
    p = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    _add_run_args(p)
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return args.func(args)
