import pytest

from .harness import init, start_node, stop


@pytest.fixture
def market(tmp_path):
    """A provider and a renter, each on the embedded chain (same chain id and escrow address:
    the renter's book takes the provider's offers; nothing here is rented)."""
    prov, rent = tmp_path / "provider", tmp_path / "renter"
    init(prov, provider=True, fake_gpus=2)
    init(rent, provider=False)
    p_proc, p_ready = start_node(prov)
    r_proc, _ = start_node(rent, "--bootstrap", p_ready["addrs"][0])
    try:
        yield prov, rent, p_proc
    finally:
        stop(r_proc)
        stop(p_proc)
