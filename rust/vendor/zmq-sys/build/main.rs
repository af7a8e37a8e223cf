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
    zeromq_src::Build::new()
        .with_libsodium(Some(zeromq_src::LibLocation::new(lib, inc)))
        .build();
}
