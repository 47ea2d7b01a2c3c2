"""The transition tables in specs/ and in the code hold exactly the same rows, both ways.

A second implementation is written from specs/negotiation.md and specs/heartbeat.md: a row the
spec has and the code lacks (or the reverse) is a disagreement one of them must fix. The tables
are parsed from the markdown as written; a row the parser does not understand fails the test
rather than being skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from protocol import messages
from protocol.encoding import Message
from protocol.negotiation import PROVIDER_TRANSITIONS, RENTER_TRANSITIONS, State as NegState
from protocol.rental import Event, ProviderRental, RenterRental, State as RentalState

SPECS = Path(__file__).resolve().parents[2] / "specs"


def tables_in_section(path: Path, heading: str) -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables (header cells, body rows of cells) in the section that starts at the
    line `heading` and runs to the next heading of the same or a higher level."""
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        start = lines.index(heading)
    except ValueError:
        raise AssertionError(f"{path.name}: no heading {heading!r}") from None
    level = len(heading) - len(heading.lstrip("#"))
    section: list[str] = []
    for line in lines[start + 1:]:
        m = re.match(r"(#+) ", line)
        if m and len(m.group(1)) <= level:
            break
        section.append(line)
    tables: list[tuple[list[str], list[list[str]]]] = []
    block: list[str] = []
    for line in section + [""]:
        if line.startswith("|"):
            block.append(line)
            continue
        if block:
            cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in block]
            assert all(set(c) <= set("-: ") for c in cells[1]), f"{heading}: no separator row"
            tables.append((cells[0], cells[2:]))
            block = []
    return tables


def the_table(path: Path, heading: str, header: list[str]) -> list[list[str]]:
    found = [rows for head, rows in tables_in_section(path, heading) if head == header]
    assert len(found) == 1, f"{path.name} {heading}: {len(found)} tables with header {header}"
    return found[0]


def message_type(name: str) -> type[Message] | None:
    cls = getattr(messages, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, Message) else None


def diff(spec: dict, code: dict) -> list[str]:
    lines = [f"only in spec: {k} -> {spec[k]}" for k in spec.keys() - code.keys()]
    lines += [f"only in code: {k} -> {code[k]}" for k in code.keys() - spec.keys()]
    lines += [f"differ: {k}: spec {spec[k]}, code {code[k]}"
              for k in spec.keys() & code.keys() if spec[k] != code[k]]
    return sorted(lines)


# ---------------------------------------------------------------------------------------------
# Negotiation: (state, message type) rows; driver calls (`start(now)`, ...) are not in the code's
# table and are recognised by their backticks.

NEGOTIATION_HEADER = ["state", "input", "guard", "action", "next"]


def negotiation_rows(heading: str) -> set[tuple[NegState, type]]:
    rows: set[tuple[NegState, type]] = set()
    for cells in the_table(SPECS / "negotiation.md", heading, NEGOTIATION_HEADER):
        state, given = cells[0], cells[1]
        if not state:
            assert not given, f"{heading}: a continuation row names an input: {cells}"
            continue  # a further guard of the row above
        if given.startswith("`"):
            continue  # a driver call: start, cancel, on_timer, withhold
        cls = message_type(given)
        assert cls is not None, f"{heading}: {given!r} is neither a message type nor a `call`"
        assert state in NegState.__members__, f"{heading}: unknown state {state!r}"
        rows.add((NegState[state], cls))
    return rows


@pytest.mark.parametrize("heading, code", [
    ("### Renter", RENTER_TRANSITIONS),
    ("### Provider", PROVIDER_TRANSITIONS),
], ids=["renter", "provider"])
def test_negotiation_spec_table__same_rows_as_code(heading, code):
    spec = {row: "handled" for row in negotiation_rows(heading)}
    assert spec, f"no message rows parsed under {heading}"
    assert diff(spec, {row: "handled" for row in code}) == []


# ---------------------------------------------------------------------------------------------
# Rental (specs/heartbeat.md): (state, input) -> next state, input a message type or an `event`.

RENTAL_HEADER = ["state", "input", "when", "next", "effects"]


def rental_rows(heading: str) -> dict[tuple[RentalState, object], RentalState]:
    rows: dict[tuple[RentalState, object], RentalState] = {}
    for cells in the_table(SPECS / "heartbeat.md", heading, RENTAL_HEADER):
        states, given, nxt = cells[0], cells[1], cells[3]
        if given.startswith("`") and given.endswith("`"):
            key: object = Event(given.strip("`"))  # ValueError names an unknown event
        else:
            key = message_type(given)
            assert key is not None, f"{heading}: {given!r} is neither a message type nor an `event`"
        for state in states.split(","):
            row = (RentalState(state.strip()), key)
            assert row not in rows, f"{heading}: {row} twice"
            rows[row] = row[0] if nxt == "same" else RentalState(nxt)
    return rows


@pytest.mark.parametrize("heading, machine", [
    ("## Provider", ProviderRental),
    ("## Renter", RenterRental),
], ids=["provider", "renter"])
def test_heartbeat_spec_table__same_rows_as_code(heading, machine):
    spec = rental_rows(heading)
    code = {row: nxt for row, (nxt, _handler) in machine.TRANSITIONS.items()}
    assert diff(spec, code) == []


def test_spec_table_parser__sees_a_missing_and_an_extra_row():
    """The comparison is not vacuous: dropping or adding a row shows up."""
    spec = rental_rows("## Renter")
    code = {row: nxt for row, (nxt, _handler) in RenterRental.TRANSITIONS.items()}
    assert len(spec) == len(code) == 29
    dropped = dict(spec)
    del dropped[(RentalState.CLOSED, Event.RECOVER_DUE)]
    assert diff(dropped, code) == [f"only in code: {(RentalState.CLOSED, Event.RECOVER_DUE)} -> done"]
    wrong = dict(spec) | {(RentalState.SILENT, messages.Heartbeat): RentalState.SILENT}
    assert len(diff(wrong, code)) == 1
    assert len(negotiation_rows("### Provider")) == len(PROVIDER_TRANSITIONS) == 4
