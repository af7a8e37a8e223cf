//! Writes seed inputs for both fuzz targets into `corpus/<target>/seed-*`.
//! Run from `fuzz/`: `cargo run --bin make_seeds`.

use std::path::Path;

use fp_wire::fuzzing::{encode_frames, flags};

fn write(dir: &Path, name: &str, data: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join(format!("seed-{name}")), data)
}

fn main() -> std::io::Result<()> {
    let hub = Path::new("corpus/hub_messages");
    let wire = Path::new("corpus/wire_parse");
    for (name, input) in fp_controller::fuzzing::seed_inputs() {
        write(hub, &name, &input)?;
        // Every message of a session seed is a wire_parse seed as well.
        if !name.starts_with("session-") {
            continue;
        }
        let json = name.contains("json");
        let mut r = fp_wire::fuzzing::FrameReader::new(&input[1..]);
        let mut i = 0;
        while let (Some(op), Some(n)) = (r.byte(), r.byte()) {
            let frames: Vec<Vec<u8>> = (0..n).filter_map(|_| r.frame()).collect();
            for extra in [
                0,
                flags::KEYED | flags::SIGN,
                flags::KEYED | flags::SIGN | flags::DIGEST,
            ] {
                let mut data = vec![extra | if json { flags::JSON } else { 0 }];
                if op & 0x10 == 0 {
                    data[0] &= !flags::SIGN;
                }
                encode_frames(&mut data, &frames);
                write(wire, &format!("{name}-{i:02}-{extra}"), &data)?;
            }
            i += 1;
        }
    }
    Ok(())
}
