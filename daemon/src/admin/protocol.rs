//! The admin wire format: one JSON object per line each way. Requests are
//! `{"id":…,"method":"…","params":{…}}`; every request gets exactly one response with the same
//! `id` and either `result` or `error {code, message}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::access::AccessError;
use crate::backup::error::BackupError;
use crate::error::StorageError;
use crate::policy::PolicyError;
use crate::servers::ServerError;

/// Bumped when a change would break an existing client.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line accepted; a longer one is answered with `parse_error` and the
/// connection closed, since the rest of that line cannot be told from the next request.
pub const MAX_LINE_BYTES: usize = 64 << 10;

/// Stable error codes: clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    Busy,
    Internal,
    ParseError,
    UnknownMethod,
    /// The backup store cannot be reached (or refuses us).
    Unavailable,
}

/// A failed request: its code and a message naming what failed with which value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct AdminError {
    pub code: ErrorCode,
    pub message: String,
}

impl AdminError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> AdminError {
        AdminError {
            code,
            message: message.into(),
        }
    }
}

impl From<StorageError> for AdminError {
    fn from(e: StorageError) -> AdminError {
        AdminError::new(error_code(&e), e.to_string())
    }
}

impl From<BackupError> for AdminError {
    fn from(e: BackupError) -> AdminError {
        AdminError::new(backup_error_code(&e), e.to_string())
    }
}

/// The one place policy failures become admin error codes.
pub fn policy_error_code(e: &PolicyError) -> ErrorCode {
    match e {
        PolicyError::InvalidName(_)
        | PolicyError::InvalidSchedule { .. }
        | PolicyError::InvalidArgument(_) => ErrorCode::InvalidArgument,
        PolicyError::NotFound(_) => ErrorCode::NotFound,
        PolicyError::AlreadyExists(_) => ErrorCode::AlreadyExists,
        PolicyError::Busy(_) => ErrorCode::Busy,
        PolicyError::File { .. } => ErrorCode::Internal,
    }
}

impl From<PolicyError> for AdminError {
    fn from(e: PolicyError) -> AdminError {
        AdminError::new(policy_error_code(&e), e.to_string())
    }
}

/// The one place access-rule failures become admin error codes.
pub fn access_error_code(e: &AccessError) -> ErrorCode {
    match e {
        AccessError::InvalidNetwork { .. }
        | AccessError::InvalidName(_)
        | AccessError::ZeroConnectionLimit
        | AccessError::ManagedByConfig(_) => ErrorCode::InvalidArgument,
        AccessError::File { .. } => ErrorCode::Internal,
    }
}

impl From<AccessError> for AdminError {
    fn from(e: AccessError) -> AdminError {
        AdminError::new(access_error_code(&e), e.to_string())
    }
}

/// The one place server (volume group) failures become admin error codes.
pub fn server_error_code(e: &ServerError) -> ErrorCode {
    match e {
        ServerError::InvalidName(_) | ServerError::Empty | ServerError::NotMember { .. } => {
            ErrorCode::InvalidArgument
        }
        ServerError::NotFound(_) => ErrorCode::NotFound,
        ServerError::AlreadyExists(_) => ErrorCode::AlreadyExists,
        ServerError::VolumeTaken { .. } => ErrorCode::Busy,
        ServerError::File { .. } => ErrorCode::Internal,
    }
}

impl From<ServerError> for AdminError {
    fn from(e: ServerError) -> AdminError {
        AdminError::new(server_error_code(&e), e.to_string())
    }
}

/// The one place backup failures become admin error codes.
pub fn backup_error_code(e: &BackupError) -> ErrorCode {
    match e {
        BackupError::Storage(storage) => error_code(storage),
        BackupError::BackupNotFound(_)
        | BackupError::JobNotFound(_)
        | BackupError::SetNotFound(_) => ErrorCode::NotFound,
        BackupError::Server(e) => server_error_code(e),
        BackupError::InvalidArgument(_)
        | BackupError::BadStoreUrl { .. }
        | BackupError::SizeMismatch { .. }
        | BackupError::JobFinished { .. }
        | BackupError::Manifest(crate::backup::manifest::ManifestError::InvalidBackupId(_)) => {
            ErrorCode::InvalidArgument
        }
        BackupError::JobRunning(_) | BackupError::BackupInUse { .. } => ErrorCode::Busy,
        BackupError::Store { .. } => ErrorCode::Unavailable,
        BackupError::ChunkMissing { .. }
        | BackupError::Chunk(_)
        | BackupError::Manifest(_)
        | BackupError::JobFile { .. }
        | BackupError::LocalStore { .. }
        | BackupError::Failed(_)
        | BackupError::Cancelled(_)
        | BackupError::CancelledByRequest => ErrorCode::Internal,
    }
}

/// The one place storage failures become admin error codes.
pub fn error_code(e: &StorageError) -> ErrorCode {
    match e {
        StorageError::InvalidName(_)
        | StorageError::InvalidSnapshotName(_)
        | StorageError::ReadOnly(_)
        | StorageError::InvalidSize(_)
        | StorageError::UnalignedSize(_)
        | StorageError::SizeTooLarge { .. }
        | StorageError::ShrinkNotAllowed { .. } => ErrorCode::InvalidArgument,
        // A size the data dir's filesystem cannot hold (ext4 files stop at 16 TiB).
        StorageError::Fs { source, .. } | StorageError::Resize { source, .. }
            if source.raw_os_error() == Some(libc::EFBIG) =>
        {
            ErrorCode::InvalidArgument
        }
        StorageError::NotFound(_) | StorageError::SnapshotNotFound { .. } => ErrorCode::NotFound,
        StorageError::AlreadyExists(_) | StorageError::SnapshotExists { .. } => {
            ErrorCode::AlreadyExists
        }
        StorageError::Busy { .. }
        | StorageError::SizeChanged { .. }
        | StorageError::SnapshotInUse { .. }
        | StorageError::IncompleteRestore { .. }
        | StorageError::Withdrawn(_)
        | StorageError::Closed { .. } => ErrorCode::Busy,
        StorageError::BadManifest { .. }
        | StorageError::Io { .. }
        | StorageError::FastZeroUnsupported { .. }
        | StorageError::Fs { .. }
        | StorageError::Resize { .. } => ErrorCode::Internal,
    }
}

/// A request as read from the socket, before its params are checked by its method.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub id: Value,
    pub method: String,
    pub params: Value,
}

/// A request line that cannot be dispatched: answered with this id (null when unknown).
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub id: Value,
    pub error: AdminError,
}

/// Parses one request line. Absent params mean `{}`.
pub fn parse_request(line: &str) -> Result<Request, Rejected> {
    let value: Value = serde_json::from_str(line).map_err(|e| Rejected {
        id: Value::Null,
        error: AdminError::new(ErrorCode::ParseError, format!("request is not JSON: {e}")),
    })?;
    let Value::Object(mut object) = value else {
        return Err(Rejected {
            id: Value::Null,
            error: AdminError::new(ErrorCode::ParseError, "request is not a JSON object"),
        });
    };
    let id = object.remove("id").unwrap_or(Value::Null);
    let reject = |message: String| Rejected {
        id: id.clone(),
        error: AdminError::new(ErrorCode::ParseError, message),
    };
    let method = match object.remove("method") {
        Some(Value::String(method)) => method,
        Some(other) => return Err(reject(format!("\"method\" {other} is not a string"))),
        None => return Err(reject("request has no \"method\"".to_owned())),
    };
    let params = match object.remove("params") {
        None | Some(Value::Null) => Value::Object(Default::default()),
        Some(params @ Value::Object(_)) => params,
        Some(other) => return Err(reject(format!("\"params\" {other} is not an object"))),
    };
    if let Some(key) = object.keys().next() {
        return Err(reject(format!("unknown request field {key:?}")));
    }
    Ok(Request { id, method, params })
}

#[derive(Debug, Serialize)]
struct SuccessLine<'a> {
    id: &'a Value,
    result: &'a Value,
}

#[derive(Debug, Serialize)]
struct ErrorLine<'a> {
    id: &'a Value,
    error: &'a AdminError,
}

/// One response line, without the newline.
pub fn response_line(id: &Value, outcome: &Result<Value, AdminError>) -> String {
    let line = match outcome {
        Ok(result) => serde_json::to_string(&SuccessLine { id, result }),
        Err(error) => serde_json::to_string(&ErrorLine { id, error }),
    };
    // Serializing a Value and plain strings cannot fail; answer something valid regardless.
    line.unwrap_or_else(|e| {
        format!(r#"{{"id":null,"error":{{"code":"internal","message":"encoding the response failed: {e}"}}}}"#)
    })
}

#[derive(Debug, Serialize)]
struct Greeting {
    evsd: GreetingBody,
}

#[derive(Debug, Serialize)]
struct GreetingBody {
    version: &'static str,
    protocol: u32,
}

/// The first line a client receives: `{"evsd":{"version":"0.1.0","protocol":1}}`.
pub fn greeting_line() -> String {
    let greeting = Greeting {
        evsd: GreetingBody {
            version: env!("CARGO_PKG_VERSION"),
            protocol: PROTOCOL_VERSION,
        },
    };
    serde_json::to_string(&greeting)
        .unwrap_or_else(|_| r#"{"evsd":{"version":"?","protocol":1}}"#.to_owned())
}

/// A size as a client may give it: bytes as a number, or text such as "10G", "512M", "4096".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeParam {
    Bytes(u64),
    Text(String),
}

/// By hand rather than `untagged`, whose error ("data did not match any variant") names
/// neither the field nor the value.
impl<'de> Deserialize<'de> for SizeParam {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        const EXPECTED: &str = "a size: whole bytes (a number) or text such as \"10G\"";
        impl serde::de::Visitor<'_> for SizeVisitor {
            type Value = SizeParam;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(EXPECTED)
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<SizeParam, E> {
                Ok(SizeParam::Bytes(v))
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<SizeParam, E> {
                u64::try_from(v)
                    .map(SizeParam::Bytes)
                    .map_err(|_| E::custom(format!("size {v}: {EXPECTED}")))
            }

            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<SizeParam, E> {
                Err(E::custom(format!("size {v}: {EXPECTED}")))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<SizeParam, E> {
                Ok(SizeParam::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

impl SizeParam {
    pub fn to_bytes(&self) -> Result<u64, StorageError> {
        match self {
            SizeParam::Bytes(bytes) => Ok(*bytes),
            SizeParam::Text(text) => crate::storage::parse_size_bytes(text),
        }
    }
}

/// Params of methods that take none.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// Params of methods that name one object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    pub name: String,
}

/// Params of methods that take one backup, set or job id.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdParams {
    pub id: String,
}

/// The answer to a method nobody implements.
pub fn unknown_method(method: &str) -> AdminError {
    AdminError::new(
        ErrorCode::UnknownMethod,
        format!("unknown method {method:?}"),
    )
}

/// Decodes a method's params, unknown fields refused so a typo never goes unnoticed. The
/// error names the field (serde's own says "expected u32" and not of what).
pub fn decode_params<T: serde::de::DeserializeOwned>(
    method: &str,
    params: Value,
) -> Result<T, AdminError> {
    serde_path_to_error::deserialize(params).map_err(|e| {
        let field = e.path().to_string();
        let error = e.into_inner();
        let message = if field == "." {
            format!("invalid params for {method}: {error}")
        } else {
            format!("invalid params for {method}: {field}: {error}")
        };
        AdminError::new(ErrorCode::InvalidArgument, message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[derive(Debug, Deserialize)]
    struct Sized {
        #[allow(dead_code)]
        size: SizeParam,
    }

    /// A bad size says it is the size, and which value it was.
    #[test]
    fn sizes_decode_from_numbers_and_text_and_bad_ones_are_named() {
        let ok: Sized = decode_params("m", json!({"size": 4096})).unwrap();
        assert_eq!(ok.size, SizeParam::Bytes(4096));
        let ok: Sized = decode_params("m", json!({"size": "10G"})).unwrap();
        assert_eq!(ok.size.to_bytes().unwrap(), 10 << 30);
        for (bad, shown) in [
            (json!(-1), "size -1"),
            (json!(4096.5), "size 4096.5"),
            (json!(1e30), "size 1000000000000000000000000000000"),
            (json!(true), "a size"),
            (json!(null), "a size"),
        ] {
            let err = decode_params::<Sized>("volume.create", json!({ "size": bad }))
                .unwrap_err()
                .message;
            assert!(err.contains(shown), "{bad}: {err}");
            assert!(err.contains("volume.create: size: "), "{bad}: {err}");
        }
    }

    #[test]
    fn parses_requests_and_rejects_malformed_lines() {
        let r = parse_request(r#"{"id":7,"method":"volume.list"}"#).unwrap();
        assert_eq!(r.id, json!(7));
        assert_eq!(r.method, "volume.list");
        assert_eq!(r.params, json!({}));
        let r = parse_request(r#"{"id":"a","method":"m","params":{"x":1}}"#).unwrap();
        assert_eq!(r.params, json!({"x":1}));

        let bad = parse_request("{nope").unwrap_err();
        assert_eq!(bad.id, Value::Null);
        assert_eq!(bad.error.code, ErrorCode::ParseError);
        for (line, id) in [
            (r#"[1,2]"#, Value::Null),
            (r#"{"id":3}"#, json!(3)),
            (r#"{"id":4,"method":5}"#, json!(4)),
            (r#"{"id":5,"method":"m","params":[1]}"#, json!(5)),
            (r#"{"id":6,"method":"m","extra":true}"#, json!(6)),
        ] {
            let bad = parse_request(line).unwrap_err();
            assert_eq!(bad.error.code, ErrorCode::ParseError, "{line}");
            assert_eq!(bad.id, id, "{line}");
        }
    }

    #[test]
    fn responses_and_greeting_have_the_documented_shape() {
        let ok = response_line(&json!(1), &Ok(json!({"a": 1})));
        assert_eq!(ok, r#"{"id":1,"result":{"a":1}}"#);
        let err = response_line(
            &json!("x"),
            &Err(AdminError::new(
                ErrorCode::NotFound,
                "volume \"v\" not found",
            )),
        );
        assert_eq!(
            serde_json::from_str::<Value>(&err).unwrap(),
            json!({"id":"x","error":{"code":"not_found","message":"volume \"v\" not found"}})
        );
        assert_eq!(
            greeting_line(),
            r#"{"evsd":{"version":"0.1.0","protocol":1}}"#
        );
    }

    #[test]
    fn storage_errors_map_to_stable_codes() {
        let io = || std::io::Error::from_raw_os_error(5);
        let cases = [
            (StorageError::InvalidName("../x".into()), "invalid_argument"),
            (StorageError::InvalidSize("1.5G".into()), "invalid_argument"),
            (StorageError::UnalignedSize(0), "invalid_argument"),
            (
                StorageError::SizeTooLarge {
                    size_bytes: 1 << 60,
                    max_bytes: 64 << 40,
                },
                "invalid_argument",
            ),
            (
                StorageError::fs(
                    "size",
                    "/d/v.data",
                    std::io::Error::from_raw_os_error(libc::EFBIG),
                ),
                "invalid_argument",
            ),
            (
                StorageError::Resize {
                    name: "v".into(),
                    size_bytes: 20 << 40,
                    source: std::io::Error::from_raw_os_error(libc::EFBIG),
                },
                "invalid_argument",
            ),
            (
                StorageError::ShrinkNotAllowed {
                    name: "v".into(),
                    from_bytes: 2,
                    to_bytes: 1,
                },
                "invalid_argument",
            ),
            (
                StorageError::SizeChanged {
                    name: "v".into(),
                    now_bytes: 3,
                    size_bytes: 2,
                },
                "busy",
            ),
            (StorageError::NotFound("v".into()), "not_found"),
            (StorageError::AlreadyExists("v".into()), "already_exists"),
            (
                StorageError::Busy {
                    name: "v".into(),
                    connections: 2,
                },
                "busy",
            ),
            (StorageError::fs("rename", "/x", io()), "internal"),
        ];
        for (error, code) in cases {
            let message = error.to_string();
            let admin = AdminError::from(error);
            assert_eq!(serde_json::to_value(admin.code).unwrap(), json!(code));
            assert_eq!(admin.message, message);
        }
    }

    #[test]
    fn sizes_are_numbers_or_text() {
        let parse = |v: Value| serde_json::from_value::<SizeParam>(v).unwrap().to_bytes();
        assert_eq!(parse(json!(4096)).unwrap(), 4096);
        assert_eq!(parse(json!("10G")).unwrap(), 10 << 30);
        assert_eq!(parse(json!("512M")).unwrap(), 512 << 20);
        assert!(matches!(
            parse(json!("1.5G")),
            Err(StorageError::InvalidSize(_))
        ));
        assert!(serde_json::from_value::<SizeParam>(json!(-1)).is_err());
    }
}
