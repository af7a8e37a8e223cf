//! Replays the committed `cargo fuzz` corpus of `wire_parse` (fuzz/corpus/wire_parse) through
//! the same harness, so CI re-checks every input the fuzzer kept, on stable and in seconds.

use std::path::Path;

#[test]
fn wire_parse_corpus_replays_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/wire_parse");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("the committed corpus") {
        let path = entry.expect("a corpus entry").path();
        let data = std::fs::read(&path).expect("a readable corpus file");
        fp_wire::fuzzing::wire_parse(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}
