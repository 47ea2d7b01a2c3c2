"""specs/parameters.md and protocol/params.py list the same parameters with the same defaults."""

import dataclasses
import pathlib

from protocol.params import Params

SPEC = pathlib.Path(__file__).resolve().parents[2] / "specs" / "parameters.md"


def spec_rows() -> dict[str, int]:
    rows = {}
    for line in SPEC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[1].isdigit():
            rows[cells[0]] = int(cells[1])
    return rows


def test_spec_parameters__table_matches_defaults():
    defaults = {f.name: getattr(Params(), f.name) for f in dataclasses.fields(Params)}
    assert spec_rows() == defaults
