"""Encrypted keystores: the only place a wallet key is written."""

import os
import stat

import pytest

from node.wallet import Wallet, WalletError


def test_wallet__keystore_round_trip_with_mode_0600(tmp_path):
    w = Wallet.create()
    path = tmp_path / "wallet.json"
    w.write_keystore(path, "correct horse")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert w.key.hex() not in path.read_text()
    assert Wallet.from_keystore(path, "correct horse") == w
    assert w.key.hex() not in repr(w)


def test_wallet__wrong_password_and_missing_file_are_clear_errors(tmp_path):
    w = Wallet.create()
    w.write_keystore(tmp_path / "k.json", "pw")
    with pytest.raises(WalletError, match="wrong password"):
        Wallet.from_keystore(tmp_path / "k.json", "not pw")
    with pytest.raises(WalletError, match="not found"):
        Wallet.from_keystore(tmp_path / "missing.json", "pw")
    with pytest.raises(FileExistsError):
        w.write_keystore(tmp_path / "k.json", "pw")  # never overwrite a keystore
