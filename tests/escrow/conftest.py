"""Fixtures for the escrow contract tests: each test runs in a boa anchor (state rolled back)."""

import boa
import pytest

from .helpers import deploy_escrow, deploy_token, fund


@pytest.fixture
def escrow():
    with boa.env.anchor():
        fund()
        yield deploy_escrow()


@pytest.fixture
def token(escrow):
    return deploy_token()
