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

# The first byte of a handshake input: top two bits pick the TLS mode, the low six the piece size
# minus one. Inputs that go on after STARTTLS use pieces of one byte, so that STARTTLS always ends
# a piece (the handshake refuses bytes that arrive together with an accepted STARTTLS).
OFF, ON, REQUIRE = 0x00, 0x40, 0x80
STEP8, STEP1 = 7, 0
prefixed = {}  # name -> (first byte, data)

def refusals(name):
    """Every option that names an export, for `name`, after structured replies for SET."""
    return (opt(6, info(name, [1, 2])) + opt(7, info(name, [3])) + opt(9, meta(name, []))
            + opt(8) + opt(10, meta(name, [b"base:allocation"])) + opt(9, meta(name, [b"qemu:"])))

for mode, mname in ((OFF, "off"), (ON, "on"), (REQUIRE, "require")):
    for export in (b"secure", b"full"):
        e = export.decode()
        prefixed[f"refused_{e}_{mname}"] = (mode | STEP8, flags + refusals(export) + opt(7, info(b"vol0")))
        prefixed[f"export_name_{e}_{mname}"] = (mode | STEP8, flags + opt(1, export))
    prefixed[f"starttls_{mname}"] = (mode | STEP1, flags + opt(5) + refusals(b"secure") + refusals(b"full")
                                     + opt(7, info(b"secure", [0, 1, 2, 3])))
    prefixed[f"starttls_export_name_secure_{mname}"] = (mode | STEP1, flags + opt(5) + opt(1, b"secure"))
    prefixed[f"starttls_export_name_full_{mname}"] = (mode | STEP1, flags + opt(5) + opt(1, b"full"))
    prefixed[f"starttls_ext_meta_{mname}"] = (mode | STEP1, flags + opt(11) + opt(5) + opt(11)
        + opt(10, meta(b"secure", [b"base:allocation", b"qemu:"])) + opt(8)
        + opt(9, meta(b"secure", [])) + opt(5) + opt(7, info(b"secure", [3, 2, 1, 0])))
    prefixed[f"starttls_with_data_{mname}"] = (mode | STEP1, flags + opt(5, b"x") + opt(3) + opt(2))
    prefixed[f"starttls_pipelined_{mname}"] = (mode | STEP8, flags + opt(5) + opt(7, info(b"vol0")))
    prefixed[f"oversize_{mname}"] = (mode | STEP8, flags + opt(6, b"\x00" * 1100) + opt(7, b"\x01" * 2000)
        + opt(10, b"\x02" * 1025) + opt(0x1234, b"\x03" * 1500) + opt(5, b"\x04" * 1100) + opt(3)
        + opt(2))
    prefixed[f"oversize_export_name_{mname}"] = (mode | STEP8, flags + opt(1, b"v" * 1025))
    prefixed[f"list_{mname}"] = (mode | STEP1, flags + opt(3) + opt(5) + opt(3) + opt(5) + opt(0) + opt(2))

prefixed["ext_meta"] = (ON | STEP8, flags + opt(11) + opt(10, meta(b"vol0", [b"base:allocation", b"qemu:"]))
    + opt(8) + opt(11) + opt(9, meta(b"vol0", [])) + opt(10, meta(b"", [b"qemu:allocation-depth"]))
    + opt(7, info(b"vol0", [0, 1, 2, 3])))
prefixed["ext_then_export_name"] = (OFF | STEP8, flags + opt(11) + opt(10, meta(b"vol0", [b"base:"]))
    + opt(1, b"vol0"))
prefixed["meta_other_export_then_go"] = (ON | STEP1, flags + opt(8) + opt(10, meta(b"full", [b"base:"]))
    + opt(10, meta(b"vol0", [b"base:allocation"])) + opt(7, info(b"")))
# Top bits 11: TLS on, and the server begins shutting down once the first piece (here the flags
# and one LIST, 20 bytes) is handled: every later option gets ERR_SHUTDOWN, ABORT its ACK, and an
# EXPORT_NAME ends the handshake.
SHUTDOWN, FIRST20 = 0xC0, 19
prefixed["shutdown_options"] = (SHUTDOWN | FIRST20, flags + opt(3) + opt(8) + opt(7, info(b"vol0"))
    + opt(5) + opt(6, b"\x00" * 1100) + opt(0x4242, b"x" * 50) + opt(3) + opt(2))
prefixed["shutdown_export_name"] = (SHUTDOWN | FIRST20, flags + opt(3) + opt(1, b"vol0"))
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
# Reply scripts: first byte picks the mode (0 simple, 1 structured, 2 extended), then per reply an
# op byte (op % 6 picks the encoder, 0x80 sets DONE), cookie, offset and the encoder's arguments.
def rop(op, *fields, done=False, cookie=0x0102030405060708, offset=0x1000):
    return struct.pack(">BQQ", op | (0x80 if done else 0), cookie, offset) + b"".join(fields)
def rerr(code, length, char, head=b""):
    return rop(2, struct.pack(">BHB", code, length, char | (len(head) << 4)), head)
def rbs(ctx, extents, done=True):
    return rop(5, struct.pack(">IB", ctx, len(extents)), *(struct.pack(">QI", l, f) for l, f in extents), done=done)
everything = (rop(0, struct.pack(">I", 22)) + rop(1) + rerr(28, 20, 0, b"disk full")
              + rop(3, struct.pack(">QI", 4096, 1 << 20)) + rop(4, struct.pack(">QI", 8192, 65536), done=True)
              + rbs(1, [(4096, 0), (8192, 3)]) + rbs(2, [(1 << 33, 1)]))
reply = {f"all_{m}": bytes([i]) + everything for i, m in enumerate(("simple", "structured", "extended"))}
for i, m in ((1, "structured"), (2, "extended")):
    reply[f"long_errors_{m}"] = bytes([i]) + rerr(5, 5000, 1) + rerr(22, 4097, 3, b"\xff\xfe") + rerr(1, 4096, 2)
    reply[f"block_status_many_{m}"] = bytes([i]) + rbs(7, [(0xFFFFFFFF, 0xFFFFFFFF)] * 15, done=False)

# Inputs that once broke an invariant, kept as `regression-*`.
regressions = {
    "handshake": {
        # INFO for a 1000-byte name of control characters: the refusal quoted it escaped, five
        # bytes per character, in an error message longer than the spec's 4096-byte limit.
        "long-escaped-name-in-error": (OFF | STEP8, flags + opt(6, info(b"\x01" * 1000))),
    },
}

for target in ("handshake", "request", "reply"):
    os.makedirs(os.path.join(here, "corpus", target), exist_ok=True)
for name, (first, data) in prefixed.items():
    with open(os.path.join(here, "corpus", "handshake", "seed-" + name), "wb") as f:
        f.write(bytes([first]) + data)
for target, inputs in regressions.items():
    for name, (first, data) in inputs.items():
        with open(os.path.join(here, "corpus", target, "regression-" + name), "wb") as f:
            f.write(bytes([first]) + data)
for target, seeds in (("handshake", handshake), ("request", request), ("reply", reply)):
    d = os.path.join(here, "corpus", target)
    os.makedirs(d, exist_ok=True)
    for name, data in seeds.items():
        prefix = b"\x07" if target == "handshake" else b""
        with open(os.path.join(d, "seed-" + name), "wb") as f:
            f.write(prefix + data)
