"""specs/vectors/exec.json matches the code, and every bad OPEN in it is refused `bad_open`."""

import json

import pytest

from node.access import CopyOpen, ExecError, ForwardOpen, Open, parse_exit, parse_refused
from tests.node.exec_vectors import PATH, build


def test_exec_vectors__committed_file_matches_the_code():
    assert json.loads(PATH.read_text()) == json.loads(json.dumps(build()))


def test_exec_vectors__valid_frames_decode_to_their_meaning():
    for v in json.loads(PATH.read_text())["valid"]:
        payload, d = bytes.fromhex(v["payload_hex"]), v["decoded"]
        if d["kind"] == "OPEN":
            o = Open.decode(payload)
            assert (o.agreement_id.hex(), int(o.tty), o.rows, o.cols, list(o.argv)) == (
                d["agreement_id"], d["tty"], d["rows"], d["cols"], d["argv"])
        elif d["kind"] == "FORWARD":
            f = ForwardOpen.decode(payload)
            assert (f.agreement_id.hex(), f.port) == (d["agreement_id"], d["port"])
        elif d["kind"] == "COPY":
            c = CopyOpen.decode(payload)
            assert (c.agreement_id.hex(), c.direction, c.path) == (d["agreement_id"], d["direction"], d["path"])
        elif d["kind"] == "EXIT":
            assert parse_exit(payload) == d["code"]
        elif d["kind"] == "REFUSED":
            assert parse_refused(payload) == (d["code"], d["detail"])


@pytest.mark.parametrize("vector", json.loads(PATH.read_text())["bad_open"], ids=lambda v: v["name"])
def test_exec_vectors__bad_open_is_refused(vector):
    with pytest.raises(ExecError) as err:
        Open.decode(bytes.fromhex(vector["payload_hex"]))
    assert err.value.code == vector["code"]


@pytest.mark.parametrize("vector", json.loads(PATH.read_text())["bad_forward_copy"], ids=lambda v: v["name"])
def test_exec_vectors__bad_forward_or_copy_is_refused(vector):
    payload = bytes.fromhex(vector["payload_hex"])
    with pytest.raises(ExecError) as err:
        (ForwardOpen if payload[0] == 0x05 else CopyOpen).decode(payload)
    assert err.value.code == vector["code"]
