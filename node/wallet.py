"""The node's EVM wallet: a secp256k1 key kept only in an encrypted eth-account keystore.

The key is decrypted in memory when the node starts; it is never printed (`repr` shows the
address) and never written in clear.
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

from eth_account import Account
from eth_utils import to_checksum_address


class WalletError(Exception):
    """The keystore is missing, malformed, or the password is wrong; str() is one line."""


@dataclass(frozen=True)
class Wallet:
    address: bytes
    key: bytes

    def __repr__(self) -> str:  # never print the key
        return f"Wallet(0x{self.address.hex()})"

    @classmethod
    def from_key(cls, key: bytes) -> "Wallet":
        acct = Account.from_key(key)
        return cls(bytes.fromhex(acct.address[2:]), bytes(key))

    @classmethod
    def create(cls) -> "Wallet":
        return cls.from_key(bytes(Account.create().key))

    @classmethod
    def from_keystore(cls, path: str | os.PathLike, password: str) -> "Wallet":
        try:
            data = json.loads(pathlib.Path(path).read_text())
            key = Account.decrypt(data, password)
        except FileNotFoundError:
            raise WalletError(f"keystore {path} not found") from None
        except (ValueError, KeyError, TypeError) as exc:  # wrong password (MAC) or malformed file
            if "MAC mismatch" in str(exc):  # the keystore's check of the derived key failed
                raise WalletError(f"wrong password for the wallet keystore {path} "
                                  "(GPUMARKET_PASSWORD or the prompt)") from None
            raise WalletError(f"cannot decrypt keystore {path}: {exc}") from None
        return cls.from_key(bytes(key))

    def write_keystore(self, path: str | os.PathLike, password: str) -> None:
        """Encrypt this wallet's key to `path`, created with mode 0600 (never overwritten)."""
        data = json.dumps(Account.encrypt(self.key, password))
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(data)

    @property
    def checksum(self) -> str:
        return to_checksum_address(self.address)
