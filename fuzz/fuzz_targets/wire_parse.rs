#![no_main]
//! Split, verify (signature, buffers digest, replay) and unpack arbitrary frames with both
//! packers, with and without a key. See `fp_wire::fuzzing`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fp_wire::fuzzing::wire_parse(data);
});
