//! Replays every file of the fuzz corpora through the fuzz entry points on stable Rust, so inputs
//! the fuzzer once found interesting stay covered by the normal test run.

use std::path::PathBuf;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let files: Vec<Vec<u8>> = entries
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(
        files.len() >= 5,
        "corpus {} has only {} files",
        dir.display(),
        files.len()
    );
    files
}

#[test]
fn handshake_corpus_replays() {
    for input in corpus("handshake") {
        evsd_proto::fuzzing::handshake(&input);
    }
}

#[test]
fn request_corpus_replays() {
    for input in corpus("request") {
        evsd_proto::fuzzing::request(&input);
    }
}
