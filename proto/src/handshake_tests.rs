use super::*;
use crate::export::BlockSize;

struct Catalog;

impl ExportCatalog for Catalog {
    fn export(&self, name: &str) -> Result<ExportInfo, ExportRefusal> {
        let name = if name.is_empty() { "vol0" } else { name };
        match name {
            // Stand-ins for what the daemon's access rules produce.
            "secure" => return Err(ExportRefusal::TlsRequired),
            "full" => return Err(ExportRefusal::Policy("connection limit reached".into())),
            "vol0" | "ro" => {}
            _ => return Err(ExportRefusal::Unknown),
        }
        Ok(ExportInfo {
            name: name.to_owned(),
            description: format!("volume {name}"),
            size_bytes: 1 << 30,
            read_only: name == "ro",
            rotational: false,
            fast_zero: true,
            block_size: BlockSize::default(),
            meta_contexts: vec!["base:allocation".into(), "qemu:allocation-depth".into()],
        })
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![
            ("vol0".into(), "volume vol0".into()),
            ("ro".into(), "volume ro".into()),
        ]
    }
}

fn option(out: &mut BytesMut, option: u32, data: &[u8]) {
    out.put_u64(IHAVEOPT);
    out.put_u32(option);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
}

fn info_payload(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        v.extend_from_slice(&r.to_be_bytes());
    }
    v
}

fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Parsed option reply: (option, type, data).
fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    while !out.is_empty() {
        assert_eq!(out.get_u64(), OPTION_REPLY_MAGIC);
        let option = out.get_u32();
        let kind = out.get_u32();
        let len = out.get_u32() as usize;
        v.push((option, kind, out[..len].to_vec()));
        out.advance(len);
    }
    v
}

/// Options asking for structured replies and `base:allocation` on vol0.
fn structured_with_base_allocation(input: &mut BytesMut) {
    option(input, OPT_STRUCTURED_REPLY, &[]);
    option(
        input,
        OPT_SET_META_CONTEXT,
        &meta_payload("vol0", &["base:allocation"]),
    );
}

fn start(flags: u32) -> (ServerHandshake, BytesMut) {
    let hs = ServerHandshake::new(HandshakeConfig::default());
    let mut greeting = BytesMut::new();
    hs.write_greeting(&mut greeting);
    assert_eq!(greeting.len(), 18);
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    assert_eq!(&greeting[8..16], b"IHAVEOPT");
    assert_eq!(&greeting[16..18], &[0, 3]);
    let mut input = BytesMut::new();
    input.put_u32(flags);
    (hs, input)
}

fn run(hs: &mut ServerHandshake, input: &mut BytesMut) -> (Result<Step, HandshakeError>, BytesMut) {
    let mut out = BytesMut::new();
    let step = hs.advance(input, &Catalog, &mut out);
    (step, out)
}

#[test]
fn unknown_client_flags_close() {
    let (mut hs, mut input) = start(0x80 | 1);
    assert_eq!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::UnknownClientFlags(0x81))
    );
}

#[test]
fn export_name_with_and_without_zeroes() {
    for (flags, len) in [(3u32, 10usize), (1, 134)] {
        let (mut hs, mut input) = start(flags);
        option(&mut input, OPT_EXPORT_NAME, b"vol0");
        let (step, out) = run(&mut hs, &mut input);
        let Ok(Step::Transmission(n)) = step else {
            panic!("{step:?}")
        };
        assert_eq!(out.len(), len);
        assert_eq!(&out[..8], &(1u64 << 30).to_be_bytes());
        let tflags = u16::from_be_bytes([out[8], out[9]]);
        assert_eq!(tflags, n.transmission_flags);
        assert_ne!(tflags & TFLAG_SEND_FLUSH, 0);
        assert_ne!(tflags & TFLAG_CAN_MULTI_CONN, 0);
        assert_eq!(
            tflags & TFLAG_SEND_DF,
            0,
            "no DF without structured replies"
        );
        assert!(out[10..].iter().all(|&b| b == 0));
        assert_eq!(n.mode, ReplyMode::Simple);
    }
}

#[test]
fn export_name_unknown_is_a_hard_disconnect() {
    let (mut hs, mut input) = start(1);
    option(&mut input, OPT_EXPORT_NAME, b"nope");
    assert_eq!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::UnknownExport("nope".into()))
    );
}

#[test]
fn byte_at_a_time_input_is_handled() {
    let (mut hs, mut whole) = start(3);
    option(&mut whole, OPT_STRUCTURED_REPLY, &[]);
    option(
        &mut whole,
        OPT_GO,
        &info_payload("vol0", &[INFO_BLOCK_SIZE]),
    );
    let mut input = BytesMut::new();
    let mut all_out = BytesMut::new();
    let mut done = None;
    for b in whole.iter() {
        input.put_u8(*b);
        let (step, out) = run(&mut hs, &mut input);
        all_out.extend_from_slice(&out);
        match step.unwrap() {
            Step::NeedInput => {}
            Step::SendFirst => panic!("two options cannot fill the unsent replies"),
            Step::Transmission(n) => done = Some(n),
            Step::Aborted => panic!("aborted"),
            Step::StartTls => panic!("STARTTLS accepted in off mode"),
        }
    }
    let n = done.expect("reached transmission");
    assert_eq!(n.mode, ReplyMode::Structured);
    assert_ne!(n.transmission_flags & TFLAG_SEND_DF, 0);
    let r = replies(&all_out);
    assert_eq!(r[0], (OPT_STRUCTURED_REPLY, REP_ACK, vec![]));
    assert_eq!(r.last().unwrap().1, REP_ACK);
}

#[test]
fn go_sends_export_name_description_block_size() {
    let (mut hs, mut input) = start(3);
    option(
        &mut input,
        OPT_GO,
        &info_payload("", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
    );
    let (step, out) = run(&mut hs, &mut input);
    assert!(matches!(step, Ok(Step::Transmission(_))));
    let r = replies(&out);
    assert_eq!(r.len(), 5);
    assert!(r.iter().all(|(o, _, _)| *o == OPT_GO));
    let export = &r[0].2;
    assert_eq!(r[0].1, REP_INFO);
    assert_eq!(export.len(), 12);
    assert_eq!(&export[0..2], &INFO_EXPORT.to_be_bytes());
    assert_eq!(&export[2..10], &(1u64 << 30).to_be_bytes());
    assert_eq!(r[1].2, [&INFO_NAME.to_be_bytes()[..], b"vol0"].concat());
    assert_eq!(
        r[2].2,
        [&INFO_DESCRIPTION.to_be_bytes()[..], b"volume vol0"].concat()
    );
    let bs = &r[3].2;
    assert_eq!(bs.len(), 14);
    assert_eq!(&bs[2..6], &1u32.to_be_bytes());
    assert_eq!(&bs[6..10], &4096u32.to_be_bytes());
    assert_eq!(&bs[10..14], &(32u32 << 20).to_be_bytes());
    assert_eq!(r[4], (OPT_GO, REP_ACK, vec![]));
}

#[test]
fn a_late_refusal_answers_go_and_lets_the_client_go_on_negotiating() {
    let (mut hs, mut input) = start(3);
    structured_with_base_allocation(&mut input);
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    let (step, out) = run(&mut hs, &mut input);
    let Ok(Step::Transmission(n)) = step else {
        panic!("GO did not end the handshake")
    };
    assert_eq!(n.ended_by, OPT_GO);
    assert_eq!(n.meta_contexts.len(), 1);
    // The burst's earlier options are answered before the GO's reply, which a refusal replaces.
    let earlier: Vec<(u32, u32)> = replies(&out[..n.final_reply_at])
        .into_iter()
        .map(|(option, kind, _)| (option, kind))
        .collect();
    assert_eq!(
        earlier,
        [
            (OPT_STRUCTURED_REPLY, REP_ACK),
            (OPT_SET_META_CONTEXT, REP_META_CONTEXT),
            (OPT_SET_META_CONTEXT, REP_ACK)
        ]
    );
    let go = replies(&out[n.final_reply_at..]);
    assert!(go.iter().all(|(option, _, _)| *option == OPT_GO), "{go:?}");
    assert_eq!(go.last().map(|r| r.1), Some(REP_ACK));
    let mut out = BytesMut::new();
    assert!(hs.refuse_late(n, ExportRefusal::Unknown, &mut out));
    assert_eq!(
        replies(&out),
        [(
            OPT_GO,
            REP_ERR_UNKNOWN,
            b"export \"vol0\" not found".to_vec()
        )]
    );

    // The client asks again: the handshake reads options, and the contexts it set still hold.
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    let Ok(Step::Transmission(n)) = run(&mut hs, &mut input).0 else {
        panic!("the second GO did not end the handshake")
    };
    assert_eq!(n.mode, ReplyMode::Structured);
    assert_eq!(
        n.meta_contexts,
        [MetaContext {
            id: 1,
            name: "base:allocation".into()
        }]
    );
    let mut out = BytesMut::new();
    assert!(hs.refuse_late(
        n,
        ExportRefusal::Policy("connection limit of 1 reached".into()),
        &mut out
    ));
    assert_eq!(
        replies(&out),
        [(
            OPT_GO,
            REP_ERR_POLICY,
            b"export \"vol0\": connection limit of 1 reached".to_vec()
        )]
    );
    // ... or gives up.
    option(&mut input, OPT_ABORT, &[]);
    assert_eq!(run(&mut hs, &mut input).0, Ok(Step::Aborted));

    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_EXPORT_NAME, b"vol0");
    let Ok(Step::Transmission(n)) = run(&mut hs, &mut input).0 else {
        panic!("EXPORT_NAME did not end the handshake")
    };
    assert_eq!(n.ended_by, OPT_EXPORT_NAME);
    let mut out = BytesMut::new();
    assert!(!hs.refuse_late(n, ExportRefusal::Unknown, &mut out));
    assert!(out.is_empty());
    option(&mut input, OPT_LIST, &[]);
    assert_eq!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::AlreadyFinished)
    );
}

#[test]
fn info_does_not_end_the_handshake_and_unknown_export_is_err_unknown() {
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_INFO, &info_payload("vol0", &[]));
    option(&mut input, OPT_INFO, &info_payload("missing", &[]));
    option(&mut input, OPT_INFO, b"\x00\x00\x00\x10short");
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::NeedInput));
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        [
            REP_INFO,
            REP_INFO,
            REP_ACK,
            REP_ERR_UNKNOWN,
            REP_ERR_INVALID
        ]
    );
}

#[test]
fn list_abort_starttls_and_unknown_options() {
    let (mut hs, mut input) = start(3);
    option(&mut input, 0x0765_4321, &[7u8; 100]);
    option(&mut input, OPT_LIST, &[]);
    option(&mut input, OPT_LIST, b"x");
    option(&mut input, OPT_STARTTLS, &[]);
    option(&mut input, OPT_ABORT, &[]);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::Aborted));
    let r = replies(&out);
    let kinds: Vec<u32> = r.iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        [
            REP_ERR_UNSUP,
            REP_SERVER,
            REP_SERVER,
            REP_ACK,
            REP_ERR_INVALID,
            REP_ERR_POLICY,
            REP_ACK
        ]
    );
    assert_eq!(r[0].0, 0x0765_4321);
    assert_eq!(&r[1].2[..4], &4u32.to_be_bytes());
    assert_eq!(&r[1].2[4..8], b"vol0");
    assert_eq!(&r[1].2[8..], b"volume vol0");
}

#[test]
fn oversized_options_are_skipped_and_the_stream_stays_in_sync() {
    let (mut hs, mut input) = start(3);
    let big = vec![0u8; 100 << 10];
    option(&mut input, OPT_GO, &big);
    option(&mut input, 0x4242, &big);
    option(&mut input, OPT_LIST, &[]);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::NeedInput));
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        [
            REP_ERR_TOO_BIG,
            REP_ERR_UNSUP,
            REP_SERVER,
            REP_SERVER,
            REP_ACK
        ]
    );
    // ABORT is ACKed whatever data it carries (the spec: the server ignores it).
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_ABORT, &big);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::Aborted));
    assert_eq!(replies(&out), [(OPT_ABORT, REP_ACK, Vec::new())]);
    // EXPORT_NAME cannot be refused politely: oversized means disconnect.
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_EXPORT_NAME, &big);
    assert!(matches!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::ExportNameTooLong { .. })
    ));
}

#[test]
fn bad_option_magic_closes() {
    let (mut hs, mut input) = start(3);
    input.put_u64(0x1234);
    input.put_u64(0);
    assert_eq!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::BadOptionMagic(0x1234))
    );
}

#[test]
fn meta_contexts_list_and_set() {
    let (mut hs, mut input) = start(3);
    // SET before structured replies is refused.
    option(
        &mut input,
        OPT_SET_META_CONTEXT,
        &meta_payload("vol0", &["base:allocation"]),
    );
    option(&mut input, OPT_STRUCTURED_REPLY, &[]);
    option(
        &mut input,
        OPT_LIST_META_CONTEXT,
        &meta_payload("vol0", &[]),
    );
    option(
        &mut input,
        OPT_LIST_META_CONTEXT,
        &meta_payload("vol0", &["qemu:"]),
    );
    option(
        &mut input,
        OPT_SET_META_CONTEXT,
        &meta_payload("vol0", &["base:allocation", "x:y", "base:"]),
    );
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    let (step, out) = run(&mut hs, &mut input);
    let Ok(Step::Transmission(n)) = step else {
        panic!("{step:?}")
    };
    assert_eq!(
        n.meta_contexts,
        [MetaContext {
            id: 1,
            name: "base:allocation".into()
        }]
    );
    let r = replies(&out);
    assert_eq!(r[0].1, REP_ERR_INVALID);
    assert_eq!(r[1].1, REP_ACK);
    // LIST with no query: both contexts, id 0.
    assert_eq!(
        r[2],
        (
            OPT_LIST_META_CONTEXT,
            REP_META_CONTEXT,
            [&[0u8; 4][..], b"base:allocation"].concat()
        )
    );
    assert_eq!(r[3].2[4..], *b"qemu:allocation-depth");
    assert_eq!(r[4].1, REP_ACK);
    assert_eq!(r[5].2[4..], *b"qemu:allocation-depth");
    assert_eq!(r[6].1, REP_ACK);
    assert_eq!(
        r[7],
        (
            OPT_SET_META_CONTEXT,
            REP_META_CONTEXT,
            [&1u32.to_be_bytes()[..], b"base:allocation"].concat()
        )
    );
    assert_eq!(r[8].1, REP_ACK);
}

#[test]
fn meta_contexts_for_another_export_are_dropped_at_go() {
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_STRUCTURED_REPLY, &[]);
    option(
        &mut input,
        OPT_SET_META_CONTEXT,
        &meta_payload("ro", &["base:allocation"]),
    );
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    let Ok(Step::Transmission(n)) = run(&mut hs, &mut input).0 else {
        panic!()
    };
    assert!(n.meta_contexts.is_empty());
}

/// "Issuing this command replaces all previously-set metadata contexts (including when this
/// command fails)": whichever way a second SET fails, GO gets no context.
#[test]
fn a_failed_set_meta_context_leaves_none_selected() {
    let oversized = vec![0u8; 100 << 10];
    let malformed = [0u8, 0, 0, 9];
    let unknown_export = meta_payload("nosuch", &["base:allocation"]);
    for (what, payload, reply) in [
        ("oversized", &oversized[..], REP_ERR_TOO_BIG),
        ("malformed", &malformed[..], REP_ERR_INVALID),
        ("unknown export", &unknown_export[..], REP_ERR_UNKNOWN),
    ] {
        let (mut hs, mut input) = start(3);
        structured_with_base_allocation(&mut input);
        option(&mut input, OPT_SET_META_CONTEXT, payload);
        option(&mut input, OPT_GO, &info_payload("vol0", &[]));
        let (step, out) = run(&mut hs, &mut input);
        let Ok(Step::Transmission(n)) = step else {
            panic!("{what}: {step:?}")
        };
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(
            kinds[..4],
            [REP_ACK, REP_META_CONTEXT, REP_ACK, reply],
            "{what}"
        );
        assert!(n.meta_contexts.is_empty(), "{what}: {:?}", n.meta_contexts);
    }
}

#[test]
fn extended_headers_then_duplicates_refused() {
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_EXTENDED_HEADERS, &[]);
    option(&mut input, OPT_EXTENDED_HEADERS, &[]);
    structured_with_base_allocation(&mut input);
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    let (step, out) = run(&mut hs, &mut input);
    let Ok(Step::Transmission(n)) = step else {
        panic!("{step:?}")
    };
    assert_eq!(n.mode, ReplyMode::Extended);
    assert_eq!(n.meta_contexts.len(), 1);
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(
        &kinds[..3],
        [REP_ACK, REP_ERR_INVALID, REP_ERR_EXT_HEADER_REQD]
    );
}

/// EXPORT_NAME cannot tell the client that transmission uses extended headers, and the spec
/// forbids it after they were negotiated: a hard disconnect, as for any EXPORT_NAME refusal.
#[test]
fn export_name_after_extended_headers_disconnects() {
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_EXTENDED_HEADERS, &[]);
    option(&mut input, OPT_EXPORT_NAME, b"vol0");
    assert_eq!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::ExportNameAfterExtendedHeaders(
            "vol0".into()
        ))
    );
    // Without them, EXPORT_NAME still works (the kernel client's path).
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_STRUCTURED_REPLY, &[]);
    option(&mut input, OPT_EXPORT_NAME, b"vol0");
    assert!(matches!(
        run(&mut hs, &mut input).0,
        Ok(Step::Transmission(_))
    ));
}

#[test]
fn contexts_chosen_before_extended_headers_stay_chosen() {
    let (mut hs, mut input) = start(3);
    structured_with_base_allocation(&mut input);
    option(&mut input, OPT_EXTENDED_HEADERS, &[]);
    option(&mut input, OPT_STRUCTURED_REPLY, &[]);
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    let (step, out) = run(&mut hs, &mut input);
    let Ok(Step::Transmission(n)) = step else {
        panic!("{step:?}")
    };
    assert_eq!(n.mode, ReplyMode::Extended);
    assert_eq!(n.meta_contexts.len(), 1, "{:?}", n.meta_contexts);
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    // ACK, META_CONTEXT + ACK, ACK, then the refused downgrade.
    assert_eq!(
        &kinds[..5],
        [
            REP_ACK,
            REP_META_CONTEXT,
            REP_ACK,
            REP_ACK,
            REP_ERR_EXT_HEADER_REQD
        ]
    );
}

#[test]
fn extended_headers_can_be_disabled() {
    let mut hs = ServerHandshake::new(HandshakeConfig {
        extended_headers: false,
        ..Default::default()
    });
    let mut input = BytesMut::new();
    input.put_u32(3);
    option(&mut input, OPT_EXTENDED_HEADERS, &[]);
    let (_, out) = run(&mut hs, &mut input);
    assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
}

#[test]
fn read_only_export_hides_write_features() {
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_EXPORT_NAME, b"ro");
    let Ok(Step::Transmission(n)) = run(&mut hs, &mut input).0 else {
        panic!()
    };
    assert_ne!(n.transmission_flags & TFLAG_READ_ONLY, 0);
    assert_eq!(
        n.transmission_flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES),
        0
    );
}

#[test]
fn too_many_options_is_fatal() {
    let mut hs = ServerHandshake::new(HandshakeConfig {
        max_options: 3,
        ..Default::default()
    });
    let mut input = BytesMut::new();
    input.put_u32(3);
    for _ in 0..4 {
        option(&mut input, OPT_LIST, &[]);
    }
    assert_eq!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::TooManyOptions(3))
    );
}

#[test]
fn advancing_after_the_end_is_an_error() {
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_ABORT, &[]);
    assert_eq!(run(&mut hs, &mut input).0, Ok(Step::Aborted));
    assert_eq!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::AlreadyFinished)
    );
}

fn start_tls_mode(tls: TlsMode) -> (ServerHandshake, BytesMut) {
    let hs = ServerHandshake::new(HandshakeConfig {
        tls,
        ..HandshakeConfig::default()
    });
    let mut input = BytesMut::new();
    input.put_u32(3);
    (hs, input)
}

#[test]
fn require_mode_refuses_everything_but_starttls_and_abort() {
    let (mut hs, mut input) = start_tls_mode(TlsMode::Require);
    option(&mut input, OPT_LIST, &[]);
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    option(&mut input, OPT_INFO, &info_payload("vol0", &[]));
    option(&mut input, OPT_STRUCTURED_REPLY, &[]);
    option(
        &mut input,
        OPT_LIST_META_CONTEXT,
        &meta_payload("vol0", &[]),
    );
    option(&mut input, 0x4242, &[1, 2, 3]);
    // Oversized: skipped, and still answered with TLS_REQD.
    option(&mut input, OPT_GO, &vec![0u8; 100 << 10]);
    option(&mut input, OPT_ABORT, &[]);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::Aborted));
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    let mut expected = vec![REP_ERR_TLS_REQD; 7];
    expected.push(REP_ACK);
    assert_eq!(kinds, expected);
    assert!(!hs.tls_active());
}

#[test]
fn require_mode_disconnects_a_plaintext_export_name() {
    let (mut hs, mut input) = start_tls_mode(TlsMode::Require);
    option(&mut input, OPT_EXPORT_NAME, b"vol0");
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Err(HandshakeError::TlsRequired("vol0".into())));
    assert!(out.is_empty());
}

#[test]
fn starttls_then_everything_works_in_require_mode() {
    let (mut hs, mut input) = start_tls_mode(TlsMode::Require);
    option(&mut input, OPT_STARTTLS, &[]);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::StartTls));
    let r = replies(&out);
    assert_eq!(r, vec![(OPT_STARTTLS, REP_ACK, vec![])]);
    assert!(hs.tls_active());
    // Now "over TLS": a second STARTTLS is invalid, options work, EXPORT_NAME is allowed.
    option(&mut input, OPT_STARTTLS, &[]);
    option(&mut input, OPT_LIST, &[]);
    option(&mut input, OPT_EXPORT_NAME, b"vol0");
    let (step, out) = run(&mut hs, &mut input);
    let Ok(Step::Transmission(n)) = step else {
        panic!("{step:?}")
    };
    assert_eq!(n.export.name, "vol0");
    let r = replies(&out[..out.len() - 10]);
    let kinds: Vec<u32> = r.iter().map(|r| r.1).collect();
    assert_eq!(kinds, [REP_ERR_INVALID, REP_SERVER, REP_SERVER, REP_ACK]);
}

#[test]
fn on_mode_serves_plaintext_and_accepts_starttls() {
    let (mut hs, mut input) = start_tls_mode(TlsMode::On);
    option(&mut input, OPT_LIST, &[]);
    option(&mut input, OPT_STARTTLS, b"junk");
    option(&mut input, OPT_STARTTLS, &[]);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::StartTls));
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(
        kinds,
        [REP_SERVER, REP_SERVER, REP_ACK, REP_ERR_INVALID, REP_ACK]
    );

    let (mut hs, mut input) = start_tls_mode(TlsMode::On);
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    let (step, _) = run(&mut hs, &mut input);
    assert!(matches!(step, Ok(Step::Transmission(_))), "{step:?}");
    assert!(!hs.tls_active());
}

#[test]
fn starttls_discards_earlier_negotiation() {
    let (mut hs, mut input) = start_tls_mode(TlsMode::On);
    structured_with_base_allocation(&mut input);
    option(&mut input, OPT_STARTTLS, &[]);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::StartTls));
    let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
    assert_eq!(kinds, [REP_ACK, REP_META_CONTEXT, REP_ACK, REP_ACK]);
    // After TLS: simple replies and no contexts, unless negotiated again.
    option(&mut input, OPT_SET_META_CONTEXT, &meta_payload("vol0", &[]));
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    let (step, out) = run(&mut hs, &mut input);
    let Ok(Step::Transmission(n)) = step else {
        panic!("{step:?}")
    };
    assert_eq!(n.mode, ReplyMode::Simple);
    assert!(n.meta_contexts.is_empty());
    assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);

    // Extended headers are forgotten too.
    let (mut hs, mut input) = start_tls_mode(TlsMode::On);
    option(&mut input, OPT_EXTENDED_HEADERS, &[]);
    option(&mut input, OPT_STARTTLS, &[]);
    assert_eq!(run(&mut hs, &mut input).0, Ok(Step::StartTls));
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    let Ok(Step::Transmission(n)) = run(&mut hs, &mut input).0 else {
        panic!("no transmission")
    };
    assert_eq!(n.mode, ReplyMode::Simple);
}

#[test]
fn bytes_pipelined_after_starttls_are_a_protocol_error() {
    let (mut hs, mut input) = start_tls_mode(TlsMode::Require);
    option(&mut input, OPT_STARTTLS, &[]);
    input.put_slice(&[0x16, 0x03, 0x01]);
    assert_eq!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::BytesAfterStartTls(3))
    );
}

#[test]
fn off_mode_refuses_starttls_with_policy_and_never_requires_tls() {
    let (mut hs, mut input) = start_tls_mode(TlsMode::Off);
    option(&mut input, OPT_STARTTLS, &[]);
    option(&mut input, OPT_EXPORT_NAME, b"vol0");
    let (step, out) = run(&mut hs, &mut input);
    assert!(matches!(step, Ok(Step::Transmission(_))), "{step:?}");
    assert_eq!(replies(&out[..out.len() - 10])[0].1, REP_ERR_POLICY);
}

#[test]
fn catalog_refusals_map_to_the_spec_replies() {
    for (tls, tls_reply) in [
        (TlsMode::On, REP_ERR_TLS_REQD),
        // A server without TLS must never send TLS_REQD.
        (TlsMode::Off, REP_ERR_POLICY),
    ] {
        let (mut hs, mut input) = start_tls_mode(tls);
        option(&mut input, OPT_INFO, &info_payload("secure", &[]));
        option(&mut input, OPT_GO, &info_payload("full", &[]));
        option(&mut input, OPT_GO, &info_payload("hidden", &[]));
        option(
            &mut input,
            OPT_LIST_META_CONTEXT,
            &meta_payload("secure", &[]),
        );
        option(&mut input, OPT_ABORT, &[]);
        let (step, out) = run(&mut hs, &mut input);
        assert_eq!(step, Ok(Step::Aborted));
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        // A meta context option is refused by policy: TLS_REQD is for INFO and GO only.
        assert_eq!(
            kinds,
            [
                tls_reply,
                REP_ERR_POLICY,
                REP_ERR_UNKNOWN,
                REP_ERR_POLICY,
                REP_ACK
            ],
            "{tls:?}"
        );
    }
}

#[test]
fn export_name_refusals_disconnect() {
    for (name, expected) in [
        ("secure", HandshakeError::TlsRequired("secure".into())),
        (
            "full",
            HandshakeError::ExportRefused {
                name: "full".into(),
                reason: "connection limit reached".into(),
            },
        ),
    ] {
        let (mut hs, mut input) = start_tls_mode(TlsMode::On);
        option(&mut input, OPT_EXPORT_NAME, name.as_bytes());
        let (step, out) = run(&mut hs, &mut input);
        assert_eq!(step, Err(expected));
        assert!(out.is_empty());
    }
}

#[test]
fn refusals_quoting_long_names_stay_within_the_string_limit() {
    // Names of the longest allowed size; control characters are escaped to five bytes each.
    for name in [
        "a".repeat(MAX_STRING_BYTES),
        "\u{1}".repeat(MAX_STRING_BYTES),
    ] {
        let (mut hs, mut input) = start(FLAG_C_FIXED_NEWSTYLE);
        option(&mut input, OPT_INFO, &info_payload(&name, &[]));
        option(&mut input, OPT_LIST_META_CONTEXT, &meta_payload(&name, &[]));
        let (step, out) = run(&mut hs, &mut input);
        assert_eq!(step, Ok(Step::NeedInput));
        let replies = replies(&out);
        assert_eq!(replies.len(), 2);
        for (_, kind, message) in replies {
            assert_eq!(kind, REP_ERR_UNKNOWN);
            assert!(message.len() <= MAX_STRING_BYTES, "{} bytes", message.len());
            assert!(std::str::from_utf8(&message).is_ok());
        }
    }
}

#[test]
fn pipelined_options_have_their_replies_sent_in_bounded_pieces() {
    let (mut hs, mut input) = start(3);
    let lists = 1500;
    for _ in 0..lists {
        option(&mut input, OPT_LIST, &[]);
    }
    let mut all_out = BytesMut::new();
    let mut pieces = 0;
    loop {
        let (step, out) = run(&mut hs, &mut input);
        assert!(
            out.len() < MAX_UNSENT_REPLY_BYTES + 1024,
            "{} bytes of replies left unsent",
            out.len()
        );
        all_out.extend_from_slice(&out);
        pieces += 1;
        match step.unwrap() {
            Step::SendFirst => assert!(!input.is_empty(), "SendFirst with no option waiting"),
            Step::NeedInput => break,
            other => panic!("unexpected step {other:?}"),
        }
    }
    assert!(pieces > 1, "all replies came in one piece");
    let r = replies(&all_out);
    assert_eq!(r.len(), lists * 3);
    assert!(r
        .chunks(3)
        .all(|c| c[0].1 == REP_SERVER && c[2].1 == REP_ACK));
}

#[test]
fn an_export_name_longer_than_a_string_closes_and_errors_quote_names_briefly() {
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_EXPORT_NAME, &[b'x'; MAX_STRING_BYTES + 1]);
    assert_eq!(
        run(&mut hs, &mut input).0,
        Err(HandshakeError::ExportNameTooLong {
            length_bytes: MAX_STRING_BYTES as u32 + 1,
            max_bytes: MAX_STRING_BYTES as u32,
        })
    );
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_EXPORT_NAME, &[b'y'; MAX_STRING_BYTES]);
    match run(&mut hs, &mut input).0 {
        Err(HandshakeError::UnknownExport(name)) => {
            assert_eq!(name, "y".repeat(MAX_QUOTED_NAME_BYTES));
        }
        other => panic!("expected UnknownExport, got {other:?}"),
    }
}

#[test]
fn a_server_shutting_down_answers_options_with_err_shutdown() {
    let (mut hs, mut input) = start(3);
    option(&mut input, OPT_LIST, &[]);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::NeedInput));
    assert_eq!(replies(&out).last().unwrap().1, REP_ACK);

    hs.begin_shutdown();
    option(&mut input, OPT_GO, &info_payload("vol0", &[]));
    option(&mut input, OPT_LIST, &[]);
    option(&mut input, OPT_STRUCTURED_REPLY, &[]);
    option(&mut input, 0x4242, &vec![0u8; 100 << 10]);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::NeedInput), "nothing ends the handshake");
    let r = replies(&out);
    let answered: Vec<(u32, u32)> = r.iter().map(|r| (r.0, r.1)).collect();
    assert_eq!(
        answered,
        [
            (OPT_GO, REP_ERR_SHUTDOWN),
            (OPT_LIST, REP_ERR_SHUTDOWN),
            (OPT_STRUCTURED_REPLY, REP_ERR_SHUTDOWN),
            (0x4242, REP_ERR_SHUTDOWN),
        ]
    );
    assert_eq!(r[0].2, b"the server is shutting down");
    // The client's soft disconnect is ACKed as ever.
    option(&mut input, OPT_ABORT, &[]);
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::Aborted));
    assert_eq!(replies(&out), [(OPT_ABORT, REP_ACK, Vec::new())]);

    // EXPORT_NAME has no error reply: the connection ends.
    let (mut hs, mut input) = start(3);
    hs.begin_shutdown();
    option(&mut input, OPT_EXPORT_NAME, b"vol0");
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(
        step,
        Err(HandshakeError::ExportNameDuringShutdown("vol0".into()))
    );
    assert!(out.is_empty());
}

/// Once TLS is up the server never answers ERR_TLS_REQD, whatever the catalog says.
#[test]
fn no_tls_required_reply_once_tls_is_up() {
    let (mut hs, mut input) = start_tls_mode(TlsMode::On);
    option(&mut input, OPT_STARTTLS, &[]);
    assert_eq!(run(&mut hs, &mut input).0, Ok(Step::StartTls));
    option(&mut input, OPT_INFO, &info_payload("secure", &[]));
    let (step, out) = run(&mut hs, &mut input);
    assert_eq!(step, Ok(Step::NeedInput));
    assert_eq!(replies(&out)[0].1, REP_ERR_POLICY);
    // Before STARTTLS it is the answer.
    let (mut hs, mut input) = start_tls_mode(TlsMode::On);
    option(&mut input, OPT_INFO, &info_payload("secure", &[]));
    assert_eq!(replies(&run(&mut hs, &mut input).1)[0].1, REP_ERR_TLS_REQD);
}
