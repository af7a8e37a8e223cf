// ferroparallel patch of zmq-sys 0.12.0's build script.
//
// Upstream calls `zeromq_src::Build::new().with_libsodium(None).build()`, which
// compiles libzmq without CURVE. Here libzmq is handed the static libsodium that
// the `libsodium-sys-stable` dependency compiled (from the source tarball bundled
// in that crate: no download, no system libsodium). Its `links = "sodium"`
// metadata arrives as DEP_SODIUM_LIB / DEP_SODIUM_INCLUDE.

fn main() {
    println!("cargo:rerun-if-changed=build/main.rs");
    println!("cargo:rerun-if-env-changed=PROFILE");

    let (lib, inc) = match (
        std::env::var("DEP_SODIUM_LIB"),
        std::env::var("DEP_SODIUM_INCLUDE"),
    ) {
        (Ok(lib), Ok(inc)) => (lib, inc),
        _ => panic!(
            "zmq-sys (ferroparallel vendored copy): DEP_SODIUM_LIB / DEP_SODIUM_INCLUDE \
             are not set; libsodium-sys-stable must be a dependency of this crate"
        ),
    };
    // libzmq's own (CMake) build detects eventfd on Linux and signals between its threads
    // with one; zeromq-src compiles with a fixed set of defines that lacks it, so libzmq fell
    // back to a socketpair: a send()/recv() through the Unix socket stack for every wake-up
    // of an I/O thread, several per task. cc reads CXXFLAGS from this process's environment.
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        let mut flags = std::env::var("CXXFLAGS").unwrap_or_default();
        flags.push_str(" -DZMQ_HAVE_EVENTFD=1 -DZMQ_HAVE_EVENTFD_CLOEXEC=1");
        std::env::set_var("CXXFLAGS", flags.trim());
    }
    println!("cargo:rerun-if-env-changed=CXXFLAGS");
    zeromq_src::Build::new()
        .with_libsodium(Some(zeromq_src::LibLocation::new(lib, inc)))
        .build();
}
