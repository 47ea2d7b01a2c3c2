"""The node's persistent ed25519 identity.

One 32-byte seed file is the whole secret. From it come the libp2p key pair (so the peer id
survives restarts) and the nacl ``SigningKey`` that signs offers: py-libp2p's Ed25519 keys wrap
PyNaCl keys, so both are the same key. The seed is written once, atomically, with mode 0600, and
never copied anywhere else; a seed file that others can read, or of the wrong length, is refused
rather than silently used or replaced.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from nacl.signing import SigningKey

SEED_LENGTH = 32


class IdentityError(Exception):
    """The seed file cannot be used as this node's identity (permissions, length, type)."""


@dataclass(frozen=True)
class NodeIdentity:
    """Everything derived from one seed; holds no copy of the seed beyond the SigningKey."""

    signing_key: SigningKey
    key_pair: KeyPair
    peer_id: ID

    @property
    def public_key(self) -> bytes:
        """The raw 32-byte ed25519 public key (what offers name as the provider key)."""
        return bytes(self.signing_key.verify_key)

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeIdentity:
        if len(seed) != SEED_LENGTH:
            raise IdentityError(f"an ed25519 seed is {SEED_LENGTH} bytes, got {len(seed)}")
        signing_key = SigningKey(seed)
        key_pair = KeyPair(Ed25519PrivateKey(signing_key), Ed25519PublicKey(signing_key.verify_key))
        return cls(signing_key, key_pair, ID.from_pubkey(key_pair.public_key))


def load_or_create_identity(path: str | os.PathLike[str]) -> NodeIdentity:
    """Load the identity from ``path``, creating a fresh seed there (0600) if it does not exist."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        _create_seed_file(path)
    return NodeIdentity.from_seed(_read_seed_file(path))


def _read_seed_file(path: Path) -> bytes:
    # O_NOFOLLOW: a symlink planted at the seed path must not redirect us to another file.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise IdentityError(f"cannot open seed file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise IdentityError(f"seed file {path} is not a regular file")
        loose = stat.S_IMODE(st.st_mode) & 0o077
        if loose:
            raise IdentityError(
                f"seed file {path} has mode {stat.S_IMODE(st.st_mode):04o}; group/other must have"
                f" no access (run: chmod 600 {path})"
            )
        seed = f.read(SEED_LENGTH + 1)
    if len(seed) != SEED_LENGTH:
        raise IdentityError(
            f"seed file {path} holds {len(seed)}{'+' if len(seed) > SEED_LENGTH else ''} bytes,"
            f" expected exactly {SEED_LENGTH}; refusing to guess (move it away to make a new identity)"
        )
    return seed


def _create_seed_file(path: Path) -> None:
    """Write a new random seed: temp file (0600, O_EXCL) + fsync + link into place + dir fsync.

    ``os.link`` fails if ``path`` appeared meanwhile, so two nodes started at once cannot
    overwrite each other's identity; the loser reads the winner's seed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may only narrow the mode, but be explicit
            os.write(fd, os.urandom(SEED_LENGTH))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
