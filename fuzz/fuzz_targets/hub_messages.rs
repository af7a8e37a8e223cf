#![no_main]
//! Sequences of signed or unsigned multipart messages fed to a fresh controller's handlers
//! (hub queries, registration, heartbeat, relays, scheduler, IOPub). See
//! `fp_controller::fuzzing`.

use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: {
        // Dropped-message warnings on stderr would cost more than the handling itself.
        fp_controller::log::set_level(fp_controller::log::Level::Error);
    },
    |data: &[u8]| {
        fp_controller::fuzzing::hub_messages(data);
    }
);
