//! Replays every file of the fuzz corpora through the fuzz entry points on stable Rust, so inputs
//! the fuzzer once found interesting stay covered by the normal test run.

use std::path::PathBuf;

/// Every file of the corpus of `target`, as (file name, contents).
fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let files: Vec<(String, Vec<u8>)> = entries
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
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
    for (name, input) in corpus("handshake") {
        // Printed only when the test fails: names the input that broke.
        println!("handshake/{name}");
        evsd_proto::fuzzing::handshake(&input);
    }
}

#[test]
fn request_corpus_replays() {
    for (name, input) in corpus("request") {
        // Printed only when the test fails: names the input that broke.
        println!("request/{name}");
        evsd_proto::fuzzing::request(&input);
    }
}

#[test]
fn reply_corpus_replays() {
    for (name, input) in corpus("reply") {
        println!("reply/{name}");
        evsd_proto::fuzzing::reply(&input);
    }
}
