"""node/lifecycle.py: the agreement states and the changes between them."""

import pytest

from node.lifecycle import TRANSITIONS, AgreementState, IllegalTransition, check_transition

S = AgreementState


@pytest.mark.parametrize("path", [
    [None, S.ACCEPTED, S.OPEN, S.STOPPED, S.SETTLED],  # provider, served and claimed
    [None, S.ACCEPTED, S.EXPIRED],  # never opened
    [None, S.ACCEPTED, S.OPEN, S.ABORTED, S.SETTLED],  # access hook failed; the renter recovers
    [None, S.AGREED, S.OPEN, S.SETTLED],  # renter
    [None, S.AGREED, S.OPEN_FAILED],
    [None, S.AGREED, S.OPEN, S.OPEN],  # a restart re-sets what it finds
])
def test_lifecycle__the_node_s_paths_are_allowed(path):
    for old, new in zip(path, path[1:]):
        assert check_transition(old, new) is new


@pytest.mark.parametrize("old, new", [
    (None, S.OPEN),  # a row starts accepted or agreed
    (S.EXPIRED, S.OPEN),  # an expired consent is never reopened
    (S.OPEN_FAILED, S.OPEN),
    (S.OPEN, S.ACCEPTED),  # no way back into negotiation
    (S.SETTLED, S.OPEN),
    (S.AGREED, S.STOPPED),  # only a provider stops
])
def test_lifecycle__other_changes_are_refused(old, new):
    with pytest.raises(IllegalTransition):
        check_transition(old, new)


def test_lifecycle__every_state_has_a_row_and_stored_strings_are_read_back():
    assert set(TRANSITIONS) == set(S)
    assert check_transition("accepted", "open") == "open"  # rows hold plain strings
    with pytest.raises(ValueError):
        check_transition("accepted", "bogus")
