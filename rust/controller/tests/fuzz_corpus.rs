//! Replays the committed `cargo fuzz` corpus of `hub_messages` (fuzz/corpus/hub_messages) and
//! the generated seeds through the same harness, so CI re-checks them on stable in seconds.

use std::path::Path;

/// Thousands of dropped-message warnings would only bury the test output.
fn quiet() {
    fp_controller::log::set_level(fp_controller::log::Level::Error);
}

#[test]
fn hub_messages_corpus_replays_cleanly() {
    quiet();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/hub_messages");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("the committed corpus") {
        let path = entry.expect("a corpus entry").path();
        let data = std::fs::read(&path).expect("a readable corpus file");
        fp_controller::fuzzing::hub_messages(&data);
        n += 1;
    }
    assert!(n > 0, "empty corpus in {}", dir.display());
}

#[test]
fn seeds_replay_cleanly() {
    quiet();
    for (_, input) in fp_controller::fuzzing::seed_inputs() {
        fp_controller::fuzzing::hub_messages(&input);
    }
}
