//! Replays the committed corpora through the decoder with the fuzz target's invariants
//! (`leasehold_decode::invariants`), on the stable toolchain: `fuzz/corpus/decode/` (first byte:
//! topic and size limit, as the fuzz target reads it) and every payload of the end-to-end corpus
//! `tests/corpus/` on each topic and limit.

use std::path::{Path, PathBuf};

use leasehold_decode::invariants::fuzz_one;

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_none_or(|x| x != "md"))
        .collect();
    v.sort();
    v
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn the_fuzz_corpus_keeps_the_decoder_invariants() {
    let corpus = files(&root().join("fuzz/corpus/decode"));
    assert!(corpus.len() >= 20, "the seed corpus is missing");
    for f in &corpus {
        let data = std::fs::read(f).expect("readable");
        if std::panic::catch_unwind(|| fuzz_one(&data)).is_err() {
            panic!("invariant broken by {}", f.display());
        }
    }
}

#[test]
fn the_end_to_end_corpus_keeps_the_decoder_invariants() {
    let corpus = files(&root().join("tests/corpus"));
    assert!(corpus.len() >= 20, "tests/corpus is missing");
    for f in &corpus {
        let payload = std::fs::read(f).expect("readable");
        // Every topic, both limits, and each format (bits 3-4).
        for sel in [0u8, 1, 2, 3, 4, 8 | 1, 16 | 2, 24] {
            let data = [&[sel][..], &payload].concat();
            if std::panic::catch_unwind(|| fuzz_one(&data)).is_err() {
                panic!("invariant broken by {} (selector {sel})", f.display());
            }
        }
    }
}
