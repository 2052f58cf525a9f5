//! Micro-benchmarks of the hot codec paths: request decode + validate, reply header encode,
//! and a whole handshake.

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, Criterion};
use evsd_proto::request::encode_request;
use evsd_proto::{decode_request, reply, Command, ExportLimits, ReplyMode, ReplyTo, Request};

fn bench_requests(c: &mut Criterion) {
    let req = Request {
        flags: 0,
        command: Command::Read,
        cookie: 42,
        offset: 1 << 20,
        length: 4096,
    };
    let limits = ExportLimits {
        size_bytes: 1 << 30,
        read_only: false,
        max_payload_bytes: 32 << 20,
        mode: ReplyMode::Structured,
        meta_contexts: 1,
    };
    for mode in [ReplyMode::Structured, ReplyMode::Extended] {
        let mut wire = Vec::new();
        encode_request(&req, mode, &mut wire);
        c.bench_function(&format!("decode+validate request ({mode:?})"), |b| {
            b.iter(|| {
                let r = decode_request(std::hint::black_box(&wire), mode)
                    .unwrap()
                    .unwrap();
                limits.validate(&r).unwrap();
                r
            })
        });
    }
    let to = ReplyTo {
        cookie: 42,
        offset: 1 << 20,
    };
    for mode in [
        ReplyMode::Simple,
        ReplyMode::Structured,
        ReplyMode::Extended,
    ] {
        c.bench_function(&format!("encode read reply header ({mode:?})"), |b| {
            let mut out = BytesMut::with_capacity(64);
            b.iter(|| {
                out.clear();
                reply::put_read_data_header(&mut out, mode, to, 1 << 20, 4096, true);
                std::hint::black_box(out.len())
            })
        });
    }
}

fn bench_handshake(c: &mut Criterion) {
    // The bytes qemu-img 10 sends: flags, EXTENDED_HEADERS, SET_META_CONTEXT, GO.
    let seed = include_bytes!("../../fuzz/corpus/handshake/seed-qemu");
    c.bench_function("handshake (qemu option sequence)", |b| {
        b.iter(|| evsd_proto::fuzzing::handshake(std::hint::black_box(seed)))
    });
}

criterion_group!(benches, bench_requests, bench_handshake);
criterion_main!(benches);
