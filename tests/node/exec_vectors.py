"""Builds specs/vectors/exec.json: the frames of /gpumarket/exec/1, /gpumarket/forward/1 and
/gpumarket/cp/1 (specs/runtime.md), each payload as hex with its decoded meaning, and OPENs a
provider must refuse with `bad_open`, and FORWARDs and COPYs refused the same way (run: python -m tests.node.exec_vectors)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import msgpack

from node.access import (ACCEPTED, COPY, COPY_IN, COPY_OUT, EXIT, FORWARD, STDERR, STDIN, STDIN_EOF,
                         STDOUT, CopyOpen, ForwardOpen, Open, exit_frame, refused_frame, resize_frame)

PATH = Path(__file__).resolve().parents[2] / "specs" / "vectors" / "exec.json"
AID = bytes(range(32))


def build() -> dict:
    valid = [
        ("open_run", Open(AID, False, 0, 0, ("nvidia-smi", "-L")).encode(),
         {"kind": "OPEN", "agreement_id": AID.hex(), "tty": 0, "rows": 0, "cols": 0, "argv": ["nvidia-smi", "-L"]}),
        ("open_shell", Open(AID, True, 50, 132, ()).encode(),
         {"kind": "OPEN", "agreement_id": AID.hex(), "tty": 1, "rows": 50, "cols": 132, "argv": []}),
        ("stdin", bytes([STDIN]) + b"ls\r", {"kind": "STDIN", "data": b"ls\r".hex()}),
        ("stdin_eof", bytes([STDIN_EOF]), {"kind": "STDIN_EOF"}),
        ("resize", resize_frame(40, 100), {"kind": "RESIZE", "rows": 40, "cols": 100}),
        ("accepted", bytes([ACCEPTED]), {"kind": "ACCEPTED"}),
        ("stdout", bytes([STDOUT]) + b"GPU 0\n", {"kind": "STDOUT", "data": b"GPU 0\n".hex()}),
        ("stderr", bytes([STDERR]) + b"oops\n", {"kind": "STDERR", "data": b"oops\n".hex()}),
        ("exit_3", exit_frame(3), {"kind": "EXIT", "code": 3}),
        ("exit_minus_1", exit_frame(-1), {"kind": "EXIT", "code": -1}),
        ("refused", refused_frame("not_renter", "only the agreement's renter may open it"),
         {"kind": "REFUSED", "code": "not_renter", "detail": "only the agreement's renter may open it"}),
        ("forward", ForwardOpen(AID, 8888).encode(), {"kind": "FORWARD", "agreement_id": AID.hex(), "port": 8888}),
        ("copy_out", CopyOpen(AID, COPY_OUT, "/scratch/out").encode(),
         {"kind": "COPY", "agreement_id": AID.hex(), "direction": 1, "path": "/scratch/out"}),
        ("copy_in", CopyOpen(AID, COPY_IN, "/scratch").encode(),
         {"kind": "COPY", "agreement_id": AID.hex(), "direction": 0, "path": "/scratch"}),
    ]
    bad = [
        ("not_open", bytes([STDIN]) + b"x"),
        ("not_msgpack", b"\x01\xc1"),
        ("four_fields", b"\x01" + msgpack.packb([AID, 0, 0, 0])),
        ("short_agreement_id", b"\x01" + msgpack.packb([AID[:31], 0, 0, 0, ["true"]])),
        ("tty_2", b"\x01" + msgpack.packb([AID, 2, 0, 0, ["true"]])),
        ("tty_bool", b"\x01" + msgpack.packb([AID, True, 0, 0, ["true"]])),
        ("tty_float", b"\x01" + msgpack.packb([AID, 1.0, 0, 0, []])),  # 1.0 == 1: a shell
        ("rows_float", b"\x01" + msgpack.packb([AID, 1, 24.0, 80, []])),
        ("rows_too_big", b"\x01" + msgpack.packb([AID, 1, 65536, 80, []])),
        ("no_command_without_tty", b"\x01" + msgpack.packb([AID, 0, 0, 0, []])),
        ("nul_in_argv", b"\x01" + msgpack.packb([AID, 0, 0, 0, ["a\x00b"]])),
        ("argv_257", b"\x01" + msgpack.packb([AID, 0, 0, 0, ["x"] * 257])),
    ]
    # FORWARD (0x05) and COPY (0x06) that are not well formed: refused bad_open as well
    bad_stream_open = [
        ("forward_port_0", bytes([FORWARD]) + msgpack.packb([AID, 0])),
        ("forward_port_float", bytes([FORWARD]) + msgpack.packb([AID, 8888.0])),
        ("forward_port_bool", bytes([FORWARD]) + msgpack.packb([AID, True])),
        ("forward_three_fields", bytes([FORWARD]) + msgpack.packb([AID, 8888, 1])),
        ("copy_direction_float", bytes([COPY]) + msgpack.packb([AID, 1.0, "/scratch"])),
        ("copy_direction_bool", bytes([COPY]) + msgpack.packb([AID, False, "/scratch"])),
        ("copy_direction_2", bytes([COPY]) + msgpack.packb([AID, 2, "/scratch"])),
        ("copy_relative_path", bytes([COPY]) + msgpack.packb([AID, 0, "scratch"])),
        ("copy_nul_in_path", bytes([COPY]) + msgpack.packb([AID, 0, "/scr\x00atch"])),
        ("copy_path_4097", bytes([COPY]) + msgpack.packb([AID, 0, "/" + "x" * 4096])),
    ]
    return {
        "about": "specs/runtime.md section 2; each frame is sent as a varint length and this payload",
        "valid": [{"name": n, "payload_hex": p.hex(), "decoded": d} for n, p, d in valid],
        "bad_open": [{"name": n, "payload_hex": p.hex(), "code": "bad_open"} for n, p in bad],
        "bad_forward_copy": [{"name": n, "payload_hex": p.hex(), "code": "bad_open"} for n, p in bad_stream_open],
    }


if __name__ == "__main__":
    PATH.write_text(json.dumps(build(), indent=1, sort_keys=True) + "\n")
    print(f"wrote {PATH}", file=sys.stderr)
