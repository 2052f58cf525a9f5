//! The names a verified client certificate carries: its subject common names and DNS subject
//! alternative names, the identities allow-lists match against.
//!
//! rustls has already verified the chain when these are read; this only extracts names. webpki
//! gives the SAN DNS names and the subject's raw DER; the subject's CN is read here with a
//! small, strict DER walk (any malformed structure yields no CN, never a panic).

use tokio_rustls::rustls::pki_types::CertificateDer;

/// OID 2.5.4.3 (id-at-commonName), DER-encoded contents.
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
const TAG_OID: u8 = 0x06;
const TAG_UTF8_STRING: u8 = 0x0c;
const TAG_PRINTABLE_STRING: u8 = 0x13;
const TAG_IA5_STRING: u8 = 0x16;
const TAG_BMP_STRING: u8 = 0x1e;
const TAG_SEQUENCE: u8 = 0x30;
const TAG_SET: u8 = 0x31;

/// Subject CNs first, then DNS SANs, without duplicates. Empty for a certificate webpki cannot
/// parse (rustls would not have accepted it).
pub fn names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(parsed) = webpki::EndEntityCert::try_from(cert) else {
        return Vec::new();
    };
    let mut names = common_names(parsed.subject());
    for dns in parsed.valid_dns_names() {
        if !names.iter().any(|n| n == dns) {
            names.push(dns.to_owned());
        }
    }
    names
}

/// One DER TLV: (tag, contents, rest). None when the length runs past the input or uses a form
/// DER forbids for our sizes.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = match first {
        0..=0x7f => (usize::from(first), rest),
        0x81 => {
            let (&b, rest) = rest.split_first()?;
            (usize::from(b), rest)
        }
        0x82 => {
            let bytes = rest.get(..2)?;
            (
                usize::from(u16::from_be_bytes([bytes[0], bytes[1]])),
                &rest[2..],
            )
        }
        _ => return None,
    };
    let contents = rest.get(..len)?;
    Some((tag, contents, &rest[len..]))
}

/// Every TLV in `input` with tag `tag`, stopping at the first malformed one.
fn each(mut input: &[u8], tag: u8) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || loop {
        let (t, contents, rest) = tlv(input)?;
        input = rest;
        if t == tag {
            return Some(contents);
        }
    })
}

/// CN values of a subject Name's contents (SEQUENCE OF SET OF SEQUENCE { OID, value }).
fn common_names(subject: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    for rdn in each(subject, TAG_SET) {
        for attribute in each(rdn, TAG_SEQUENCE) {
            let Some((TAG_OID, oid, value)) = tlv(attribute) else {
                continue;
            };
            if oid != OID_COMMON_NAME {
                continue;
            }
            if let Some(name) = tlv(value).and_then(|(tag, text, _)| decode_string(tag, text)) {
                names.push(name);
            }
        }
    }
    names
}

fn decode_string(tag: u8, text: &[u8]) -> Option<String> {
    match tag {
        TAG_UTF8_STRING | TAG_PRINTABLE_STRING | TAG_IA5_STRING => {
            std::str::from_utf8(text).ok().map(str::to_owned)
        }
        TAG_BMP_STRING if text.len().is_multiple_of(2) => {
            let units = text
                .chunks_exact(2)
                .map(|u| u16::from_be_bytes([u[0], u[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if contents.len() < 0x80 {
            out.push(contents.len() as u8);
        } else {
            out.push(0x81);
            out.push(contents.len() as u8);
        }
        out.extend_from_slice(contents);
        out
    }

    fn attribute(oid: &[u8], tag: u8, value: &[u8]) -> Vec<u8> {
        let mut seq = der(TAG_OID, oid);
        seq.extend(der(tag, value));
        der(TAG_SET, &der(TAG_SEQUENCE, &seq))
    }

    #[test]
    fn finds_common_names_among_other_attributes() {
        let mut subject = attribute(&[0x55, 0x04, 0x06], TAG_PRINTABLE_STRING, b"DE");
        subject.extend(attribute(
            OID_COMMON_NAME,
            TAG_UTF8_STRING,
            "client-ä".as_bytes(),
        ));
        subject.extend(attribute(&[0x55, 0x04, 0x0a], TAG_UTF8_STRING, b"evsd"));
        subject.extend(attribute(OID_COMMON_NAME, TAG_BMP_STRING, &[0, b'b']));
        assert_eq!(common_names(&subject), ["client-ä", "b"]);
    }

    #[test]
    fn malformed_subjects_give_no_names_and_never_panic() {
        let good = attribute(OID_COMMON_NAME, TAG_UTF8_STRING, b"a-long-enough-name");
        for cut in 0..good.len() {
            // Truncated anywhere: either nothing or nothing wrong.
            for name in common_names(&good[..cut]) {
                assert_eq!(name, "a-long-enough-name");
            }
        }
        assert!(common_names(&[TAG_SET, 0x84, 1, 2, 3, 4]).is_empty());
        assert!(common_names(&attribute(OID_COMMON_NAME, TAG_BMP_STRING, &[0])).is_empty());
        assert!(common_names(&attribute(OID_COMMON_NAME, 0x04, b"octets")).is_empty());
    }
}
