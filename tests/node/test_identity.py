import os
import stat

import pytest
from libp2p.peer.id import ID
from nacl.signing import VerifyKey

from node.identity import IdentityError, NodeIdentity, load_or_create_identity


def test_identity__created_with_mode_0600_and_stable_across_loads(tmp_path):
    path = tmp_path / "keys" / "node.seed"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32
    second = load_or_create_identity(path)
    assert first.peer_id == second.peer_id
    assert first.public_key == second.public_key
    # no temp files or copies of the seed left beside it
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.seed"]


def test_identity__same_key_signs_offers_and_names_the_peer():
    ident = NodeIdentity.from_seed(bytes(range(32)))
    assert len(ident.public_key) == 32
    # the libp2p public key is the nacl verify key
    assert ident.key_pair.public_key.to_bytes() == ident.public_key
    assert ident.peer_id == ID.from_pubkey(ident.key_pair.public_key)
    msg = b"offer bytes"
    sig = ident.signing_key.sign(msg).signature
    assert VerifyKey(ident.public_key).verify(msg, sig) == msg
    # a libp2p signature verifies with the nacl key too: one key, two uses
    lsig = ident.key_pair.private_key.sign(msg)
    assert VerifyKey(ident.public_key).verify(msg, lsig) == msg


def test_identity__different_seeds_give_different_peers(tmp_path):
    a = load_or_create_identity(tmp_path / "a.seed")
    b = load_or_create_identity(tmp_path / "b.seed")
    assert a.peer_id != b.peer_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_identity__refuses_seed_readable_by_others(tmp_path, mode):
    path = tmp_path / "node.seed"
    load_or_create_identity(path)
    os.chmod(path, mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(path)


@pytest.mark.parametrize("length", [0, 31, 33, 64])
def test_identity__refuses_seed_of_wrong_length(tmp_path, length):
    path = tmp_path / "node.seed"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"\x01" * length)
    os.close(fd)
    with pytest.raises(IdentityError, match="expected exactly 32"):
        load_or_create_identity(path)
    assert path.stat().st_size == length  # never overwritten


def test_identity__refuses_symlinked_seed(tmp_path):
    real = tmp_path / "real.seed"
    load_or_create_identity(real)
    link = tmp_path / "node.seed"
    link.symlink_to(real)
    with pytest.raises(IdentityError):
        load_or_create_identity(link)


def test_identity__from_seed_rejects_wrong_length():
    with pytest.raises(IdentityError):
        NodeIdentity.from_seed(b"\x00" * 31)
