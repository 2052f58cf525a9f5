#!/usr/bin/env python3
"""Writes the seed corpora for the fuzz targets (valid and near-valid NBD traffic)."""
import os, struct

IHAVEOPT = 0x49484156454F5054
here = os.path.dirname(os.path.abspath(__file__))

def opt(num, data=b""):
    return struct.pack(">QII", IHAVEOPT, num, len(data)) + data

def info(name, reqs=()):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs)) + b"".join(struct.pack(">H", r) for r in reqs)

def meta(name, queries):
    return struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries)) + b"".join(struct.pack(">I", len(q)) + q for q in queries)

flags = struct.pack(">I", 3)
handshake = {
    "export_name": flags + opt(1, b"vol0"),
    "go": flags + opt(8) + opt(7, info(b"vol0", [0, 1, 2, 3])),
    "qemu": flags + opt(11) + opt(10, meta(b"vol0", [b"base:allocation"])) + opt(7, info(b"vol0", [3])),
    "nbdinfo": flags + opt(8) + opt(6, info(b"vol0", [3, 2, 1])) + opt(9, meta(b"vol0", [])) + opt(7, info(b"vol0")),
    "list_abort": flags + opt(3) + opt(5) + opt(0x7654321, b"x" * 100) + opt(2),
    "bad_flags": struct.pack(">I", 0x80),
    "bad_magic": flags + b"\x00" * 16,
    "huge_option": flags + struct.pack(">QII", IHAVEOPT, 7, 0xFFFFFFF0),
    "truncated_info": flags + opt(6, b"\x00\x00\x00\xff"),
}
REQ, EXT = 0x25609513, 0x21e41c71
def req(flags, cmd, off, length, ext=False):
    if ext:
        return struct.pack(">IHHQQQ", EXT, flags, cmd, 1, off, length)
    return struct.pack(">IHHQQI", REQ, flags, cmd, 1, off, length)
request = {
    "read": req(0, 0, 0, 4096),
    "write_fua": req(1, 1, 4096, 512),
    "flush": req(0, 3, 0, 0),
    "trim_past_end": req(0, 4, (1 << 30) - 1, 2),
    "zero_fast": req(0x12, 6, 0, 1 << 20),
    "block_status_ext": req(8, 7, 0, 1 << 40, ext=True),
    "write_payload_len_ext": req(0x20, 1, 0, 1 << 26, ext=True),
    "unknown_cmd": req(0, 99, 0, 1),
    "bad_magic": b"\xff" * 32,
}
for target, seeds in (("handshake", handshake), ("request", request)):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        prefix = b"\x07" if target == "handshake" else b""
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(prefix + data)
