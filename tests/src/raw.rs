//! A deliberately small, independent NBD wire client (big-endian frames built
//! by hand) for protocol-level tests. It does not use the project's proto
//! crate, so the tests check the wire format independently.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const EXT_REQUEST_MAGIC: u32 = 0x21e4_1c71;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
pub const EXT_REPLY_MAGIC: u32 = 0x6e8a_278c;

// handshake flags
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const CFLAG_FIXED_NEWSTYLE: u32 = 1;
pub const CFLAG_NO_ZEROES: u32 = 2;

// options
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

// option replies
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_SHUTDOWN: u32 = 0x8000_0007;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

// info types
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// transmission flags
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// commands
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

// structured reply chunk types
pub const CHUNK_NONE: u16 = 0;
pub const CHUNK_OFFSET_DATA: u16 = 1;
pub const CHUNK_OFFSET_HOLE: u16 = 2;
pub const CHUNK_BLOCK_STATUS: u16 = 5;
pub const CHUNK_ERROR: u16 = 0x8001;
pub const CHUNK_ERROR_OFFSET: u16 = 0x8002;
pub const REPLY_FLAG_DONE: u16 = 1;

// errno values on the wire
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

pub const IO_TIMEOUT: Duration = Duration::from_secs(15);

pub fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes(b[..2].try_into().unwrap())
}
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// One option reply (fixed newstyle).
#[derive(Debug, Clone)]
pub struct OptReply {
    pub opt: u32,
    pub typ: u32,
    pub data: Vec<u8>,
}

impl OptReply {
    pub fn is_err(&self) -> bool {
        self.typ & 0x8000_0000 != 0
    }
}

/// A structured reply chunk (compact or extended header).
#[derive(Debug, Clone)]
pub struct Chunk {
    pub flags: u16,
    pub typ: u16,
    pub cookie: u64,
    pub payload: Vec<u8>,
}

impl Chunk {
    pub fn done(&self) -> bool {
        self.flags & REPLY_FLAG_DONE != 0
    }
}

/// Result of a negotiated export.
#[derive(Debug, Clone, Copy)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
}

pub struct Raw {
    pub s: TcpStream,
    pub structured: bool,
    pub extended: bool,
}

impl Raw {
    /// Plain TCP connection, nothing read yet.
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        Raw {
            s,
            structured: false,
            extended: false,
        }
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s
            .write_all(b)
            .unwrap_or_else(|e| panic!("send {} bytes: {e}", b.len()));
    }

    pub fn try_send(&mut self, b: &[u8]) -> io::Result<()> {
        self.s.write_all(b)
    }

    pub fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s
            .read_exact(&mut v)
            .unwrap_or_else(|e| panic!("recv {n} bytes: {e}"));
        v
    }

    /// Read the 18-byte newstyle greeting; returns the handshake flags.
    pub fn read_greeting(&mut self) -> u16 {
        let g = self.recv(18);
        assert_eq!(be64(&g[0..8]), NBDMAGIC, "greeting: bad NBDMAGIC {g:02x?}");
        assert_eq!(be64(&g[8..16]), IHAVEOPT, "greeting: bad IHAVEOPT {g:02x?}");
        be16(&g[16..18])
    }

    /// connect + greeting (asserting FIXED_NEWSTYLE|NO_ZEROES) + client flags.
    pub fn handshake(addr: SocketAddr, client_flags: u32) -> Raw {
        let mut r = Raw::connect(addr);
        let f = r.read_greeting();
        assert_eq!(
            f,
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES,
            "handshake flags: expected FIXED_NEWSTYLE|NO_ZEROES, got {f:#06x}"
        );
        r.send(&client_flags.to_be_bytes());
        r
    }

    pub fn send_opt(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn read_opt_reply(&mut self) -> OptReply {
        let h = self.recv(20);
        assert_eq!(
            be64(&h[0..8]),
            OPT_REPLY_MAGIC,
            "option reply: bad magic {h:02x?}"
        );
        let opt = be32(&h[8..12]);
        let typ = be32(&h[12..16]);
        let len = be32(&h[16..20]) as usize;
        assert!(len <= 1 << 20, "option reply length {len} is absurd");
        let data = self.recv(len);
        OptReply { opt, typ, data }
    }

    /// Read an option reply and assert it answers `opt` with type `typ`.
    pub fn expect_opt_reply(&mut self, opt: u32, typ: u32) -> OptReply {
        let r = self.read_opt_reply();
        assert_eq!(r.opt, opt, "option reply echoes option {} not {opt}", r.opt);
        assert_eq!(
            r.typ, typ,
            "option {opt}: expected reply type {typ:#x}, got {:#x} (data {:?})",
            r.typ, r.data
        );
        r
    }

    /// Send an option with no data and expect a bare ACK.
    pub fn opt_ack(&mut self, opt: u32) {
        self.send_opt(opt, &[]);
        let r = self.expect_opt_reply(opt, REP_ACK);
        assert!(r.data.is_empty(), "ACK with data {:?}", r.data);
    }

    /// NBD_OPT_LIST; returns the export names.
    pub fn list(&mut self) -> Vec<String> {
        self.send_opt(OPT_LIST, &[]);
        let mut names = Vec::new();
        loop {
            let r = self.read_opt_reply();
            assert_eq!(r.opt, OPT_LIST);
            match r.typ {
                REP_ACK => return names,
                REP_SERVER => {
                    assert!(r.data.len() >= 4, "short REP_SERVER");
                    let n = be32(&r.data) as usize;
                    assert!(4 + n <= r.data.len(), "REP_SERVER name overruns payload");
                    names.push(String::from_utf8(r.data[4..4 + n].to_vec()).unwrap());
                }
                t => panic!("unexpected reply {t:#x} to LIST"),
            }
        }
    }

    /// NBD_OPT_EXPORT_NAME; returns size and transmission flags. Reads the
    /// 124 zero bytes unless `no_zeroes` (and asserts they are zero).
    pub fn export_name(&mut self, name: &str, no_zeroes: bool) -> ExportInfo {
        self.send_opt(OPT_EXPORT_NAME, name.as_bytes());
        let b = self.recv(10);
        let info = ExportInfo {
            size: be64(&b[0..8]),
            flags: be16(&b[8..10]),
        };
        if !no_zeroes {
            let z = self.recv(124);
            assert!(z.iter().all(|&x| x == 0), "EXPORT_NAME padding not zero");
        }
        info
    }

    /// Build the GO/INFO payload.
    pub fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Send GO or INFO and collect replies up to the final one (ACK or error).
    pub fn info_or_go(&mut self, opt: u32, name: &str, infos: &[u16]) -> Vec<OptReply> {
        self.send_opt(opt, &Self::go_payload(name, infos));
        let mut v = Vec::new();
        loop {
            let r = self.read_opt_reply();
            assert_eq!(r.opt, opt, "reply to wrong option");
            let last = r.typ == REP_ACK || r.is_err();
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// GO that must succeed; returns export info from NBD_INFO_EXPORT.
    pub fn go(&mut self, name: &str, infos: &[u16]) -> (ExportInfo, Vec<OptReply>) {
        let v = self.info_or_go(OPT_GO, name, infos);
        let last = v.last().unwrap();
        assert_eq!(
            last.typ,
            REP_ACK,
            "GO {name:?} failed: {:#x} {:?}",
            last.typ,
            String::from_utf8_lossy(&last.data)
        );
        let mut info = None;
        for r in &v {
            if r.typ == REP_INFO && be16(&r.data) == INFO_EXPORT {
                assert_eq!(r.data.len(), 12, "INFO_EXPORT length");
                info = Some(ExportInfo {
                    size: be64(&r.data[2..10]),
                    flags: be16(&r.data[10..12]),
                });
            }
        }
        (info.expect("successful GO without NBD_INFO_EXPORT"), v)
    }

    /// Fixed-newstyle client (NO_ZEROES) that did GO on `export`: simple replies.
    pub fn open(addr: SocketAddr, export: &str) -> (Raw, ExportInfo) {
        let mut r = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
        let (info, _) = r.go(export, &[]);
        (r, info)
    }

    /// Like [`Raw::open`] but negotiates structured replies first.
    pub fn open_structured(addr: SocketAddr, export: &str) -> (Raw, ExportInfo) {
        let mut r = Raw::handshake(addr, CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES);
        r.opt_ack(OPT_STRUCTURED_REPLY);
        r.structured = true;
        let (info, _) = r.go(export, &[]);
        (r, info)
    }

    // -- transmission ------------------------------------------------------

    pub fn request_bytes(flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// `data` as consecutive WRITEs of `write_bytes` from offset 0, cookies counting up from
    /// `first_cookie`, then NBD_CMD_DISC (cookie 0xd15c): one burst for a single send.
    pub fn writes_then_disc(data: &[u8], write_bytes: u64, first_cookie: u64) -> Vec<u8> {
        let mut burst = Vec::with_capacity(data.len() + data.len() / write_bytes as usize * 28);
        for (i, payload) in data.chunks(write_bytes as usize).enumerate() {
            let i = i as u64;
            burst.extend(Raw::request_bytes(
                0,
                CMD_WRITE,
                first_cookie + i,
                i * write_bytes,
                payload.len() as u32,
            ));
            burst.extend_from_slice(payload);
        }
        burst.extend(Raw::request_bytes(0, CMD_DISC, 0xd15c, 0, 0));
        burst
    }

    pub fn ext_request_bytes(flags: u16, typ: u16, cookie: u64, offset: u64, len: u64) -> Vec<u8> {
        let mut b = Vec::with_capacity(32);
        b.extend_from_slice(&EXT_REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&typ.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b
    }

    /// Send a compact request (with `payload` appended for writes).
    pub fn send_req(
        &mut self,
        flags: u16,
        typ: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) {
        let mut b = Self::request_bytes(flags, typ, cookie, offset, len);
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Read a 16-byte simple reply header; returns (error, cookie).
    pub fn read_simple_reply(&mut self) -> (u32, u64) {
        let h = self.recv(16);
        assert_eq!(
            be32(&h[0..4]),
            SIMPLE_REPLY_MAGIC,
            "expected simple reply magic, got header {h:02x?}"
        );
        (be32(&h[4..8]), be64(&h[8..16]))
    }

    /// Read one structured chunk (20-byte header, or 32-byte when extended).
    pub fn read_chunk(&mut self) -> Chunk {
        if self.extended {
            let h = self.recv(32);
            assert_eq!(
                be32(&h[0..4]),
                EXT_REPLY_MAGIC,
                "expected extended reply magic, got {h:02x?}"
            );
            let len = be64(&h[24..32]);
            assert!(len <= 64 << 20, "chunk length {len} absurd");
            let payload = self.recv(len as usize);
            Chunk {
                flags: be16(&h[4..6]),
                typ: be16(&h[6..8]),
                cookie: be64(&h[8..16]),
                payload,
            }
        } else {
            let h = self.recv(20);
            assert_eq!(
                be32(&h[0..4]),
                STRUCTURED_REPLY_MAGIC,
                "expected structured reply magic, got {h:02x?}"
            );
            let len = be32(&h[16..20]) as usize;
            assert!(len <= 64 << 20, "chunk length {len} absurd");
            let payload = self.recv(len);
            Chunk {
                flags: be16(&h[4..6]),
                typ: be16(&h[6..8]),
                cookie: be64(&h[8..16]),
                payload,
            }
        }
    }

    /// Read chunks for one request until the DONE flag.
    pub fn read_chunks(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut v = Vec::new();
        loop {
            let c = self.read_chunk();
            assert_eq!(c.cookie, cookie, "chunk for unexpected cookie: {c:?}");
            let done = c.done();
            v.push(c);
            if done {
                return v;
            }
            assert!(v.len() < 100_000, "too many chunks");
        }
    }

    /// Read the reply to a non-READ command (simple or, when negotiated,
    /// structured/extended); returns the error value (0 = success).
    pub fn read_status(&mut self, cookie: u64) -> u32 {
        if !self.structured && !self.extended {
            let (err, c) = self.read_simple_reply();
            assert_eq!(c, cookie, "reply cookie mismatch");
            return err;
        }
        // Both simple and structured replies are allowed for non-READ
        // commands with structured replies; extended forbids simple ones.
        let mut peek = [0u8; 4];
        self.s.peek(&mut peek).expect("peek reply magic");
        if be32(&peek) == SIMPLE_REPLY_MAGIC {
            assert!(!self.extended, "simple reply after extended headers");
            let (err, c) = self.read_simple_reply();
            assert_eq!(c, cookie);
            return err;
        }
        let chunks = self.read_chunks(cookie);
        let mut err = 0;
        for c in &chunks {
            if c.typ & 0x8000 != 0 {
                err = be32(&c.payload);
            }
        }
        err
    }

    /// Simple-reply READ that must succeed.
    pub fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        assert!(!self.structured, "use read_structured");
        self.send_req(0, CMD_READ, cookie, offset, len, &[]);
        let (err, c) = self.read_simple_reply();
        assert_eq!(c, cookie, "READ reply cookie");
        assert_eq!(err, 0, "READ {offset}+{len} failed with error {err}");
        self.recv(len as usize)
    }

    /// WRITE that must succeed.
    pub fn write(&mut self, cookie: u64, flags: u16, offset: u64, data: &[u8]) {
        self.send_req(flags, CMD_WRITE, cookie, offset, data.len() as u32, data);
        let err = self.read_status(cookie);
        assert_eq!(
            err,
            0,
            "WRITE {offset}+{} failed with error {err}",
            data.len()
        );
    }

    /// Generic command without payload; returns the error value.
    pub fn command(&mut self, flags: u16, typ: u16, cookie: u64, offset: u64, len: u32) -> u32 {
        self.send_req(flags, typ, cookie, offset, len, &[]);
        self.read_status(cookie)
    }

    pub fn flush(&mut self, cookie: u64) {
        let e = self.command(0, CMD_FLUSH, cookie, 0, 0);
        assert_eq!(e, 0, "FLUSH failed with error {e}");
    }

    /// Send NBD_CMD_DISC and expect the server to close the connection.
    pub fn disconnect(mut self) {
        self.send_req(0, CMD_DISC, 0xd15c, 0, 0, &[]);
        self.expect_closed("after NBD_CMD_DISC");
    }

    /// Structured READ; returns the reassembled data (holes as zeroes) and
    /// the chunks. Asserts that data/hole chunks cover the range exactly once.
    pub fn read_structured(&mut self, cookie: u64, offset: u64, len: u32) -> (Vec<u8>, Vec<Chunk>) {
        self.send_req(0, CMD_READ, cookie, offset, len, &[]);
        let chunks = self.read_chunks(cookie);
        let data = assemble_read(offset, len, &chunks);
        (data, chunks)
    }

    /// Expect the peer to close the connection (EOF or reset) within the I/O
    /// timeout, discarding anything it sends first (at most 1 MiB).
    pub fn expect_closed(&mut self, what: &str) {
        let start = Instant::now();
        let mut buf = [0u8; 65536];
        let mut total = 0usize;
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    total += n;
                    assert!(
                        total <= 1 << 20,
                        "{what}: server kept sending data instead of closing"
                    );
                }
                Err(e)
                    if e.kind() == ErrorKind::ConnectionReset
                        || e.kind() == ErrorKind::BrokenPipe
                        || e.kind() == ErrorKind::ConnectionAborted =>
                {
                    return
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    panic!(
                        "{what}: server did not close the connection within {:?}",
                        start.elapsed()
                    )
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("{what}: unexpected read error {e}"),
            }
        }
    }

    /// Asserts an orderly end of stream next: no byte more, and no reset.
    pub fn expect_eof(&mut self, what: &str) {
        let mut buf = [0u8; 1];
        match self.s.read(&mut buf) {
            Ok(0) => {}
            Ok(_) => panic!("{what}: more bytes instead of the end of stream"),
            Err(e) => panic!("{what}: {e} instead of the end of stream"),
        }
    }

    pub fn shutdown_write(&self) {
        let _ = self.s.shutdown(Shutdown::Write);
    }
}

// -- any stream (Unix sockets too) -------------------------------------------

/// Exactly `n` bytes from `s`.
pub fn recv_exact<S: Read>(s: &mut S, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v)
        .unwrap_or_else(|e| panic!("recv {n} bytes: {e}"));
    v
}

pub fn send_option<S: Write>(s: &mut S, opt: u32, data: &[u8]) {
    let mut b = IHAVEOPT.to_be_bytes().to_vec();
    b.extend(opt.to_be_bytes());
    b.extend((data.len() as u32).to_be_bytes());
    b.extend(data);
    s.write_all(&b).unwrap();
}

/// Option replies up to the ACK; panics on an error reply.
pub fn until_ack<S: Read>(s: &mut S, opt: u32) {
    loop {
        let h = recv_exact(s, 20);
        assert_eq!(be64(&h[0..8]), OPT_REPLY_MAGIC);
        assert_eq!(be32(&h[8..12]), opt);
        let typ = be32(&h[12..16]);
        recv_exact(s, be32(&h[16..20]) as usize);
        assert_eq!(typ & 0x8000_0000, 0, "option {opt} refused: {typ:#x}");
        if typ == REP_ACK {
            return;
        }
    }
}

/// Fixed newstyle with NO_ZEROES, `options` (each without data) acknowledged in turn, then GO
/// on `export`.
pub fn open_stream<S: Read + Write>(s: &mut S, export: &str, options: &[u32]) {
    let greeting = recv_exact(s, 18);
    assert_eq!(be64(&greeting[0..8]), NBDMAGIC);
    s.write_all(&(CFLAG_FIXED_NEWSTYLE | CFLAG_NO_ZEROES).to_be_bytes())
        .unwrap();
    for &opt in options {
        send_option(s, opt, &[]);
        until_ack(s, opt);
    }
    send_option(s, OPT_GO, &Raw::go_payload(export, &[]));
    until_ack(s, OPT_GO);
}

/// Check structured READ chunks: OFFSET_DATA/OFFSET_HOLE chunks must lie in
/// [offset, offset+len), must not overlap, must cover it completely, and the
/// last chunk carries DONE. Returns the data.
pub fn assemble_read(offset: u64, len: u32, chunks: &[Chunk]) -> Vec<u8> {
    let mut data = vec![0u8; len as usize];
    let mut covered: Vec<(u64, u64)> = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        if c.done() {
            assert_eq!(i, chunks.len() - 1, "DONE flag before the last chunk");
        }
        match c.typ {
            CHUNK_OFFSET_DATA => {
                assert!(c.payload.len() > 8, "OFFSET_DATA chunk with no data");
                let o = be64(&c.payload);
                let n = (c.payload.len() - 8) as u64;
                assert!(
                    o >= offset && o + n <= offset + len as u64,
                    "OFFSET_DATA {o}+{n} outside request {offset}+{len}"
                );
                let s = (o - offset) as usize;
                data[s..s + n as usize].copy_from_slice(&c.payload[8..]);
                covered.push((o, n));
            }
            CHUNK_OFFSET_HOLE => {
                assert_eq!(c.payload.len(), 12, "OFFSET_HOLE payload length");
                let o = be64(&c.payload);
                let n = be32(&c.payload[8..]) as u64;
                assert!(n > 0, "zero-length OFFSET_HOLE");
                assert!(
                    o >= offset && o + n <= offset + len as u64,
                    "OFFSET_HOLE {o}+{n} outside request {offset}+{len}"
                );
                covered.push((o, n));
            }
            CHUNK_NONE => {
                assert!(c.done(), "NONE chunk without DONE");
                assert!(c.payload.is_empty(), "NONE chunk with payload");
            }
            t if t & 0x8000 != 0 => panic!(
                "READ {offset}+{len} got error chunk {t:#x}: errno {}",
                be32(&c.payload)
            ),
            t => panic!("READ got unexpected chunk type {t}"),
        }
    }
    assert!(
        chunks.last().map(|c| c.done()).unwrap_or(false),
        "no DONE chunk"
    );
    covered.sort();
    let mut pos = offset;
    for (o, n) in &covered {
        assert_eq!(
            *o, pos,
            "READ {offset}+{len}: chunks leave a gap or overlap at {pos} (chunks: {covered:?})"
        );
        pos = o + n;
    }
    assert_eq!(
        pos,
        offset + len as u64,
        "READ {offset}+{len}: chunks do not cover the range (chunks: {covered:?})"
    );
    data
}
