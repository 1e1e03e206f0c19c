//! The daemon's config file (`bulkhead run --config`), any bytes: a clean
//! error naming the position, or the options.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `run` reads the file as UTF-8 text and refuses anything else.
    let Ok(text) = std::str::from_utf8(data) else { return };
    match enforcer::config_file::parse_file("config.yaml", text) {
        Ok(args) => std::hint::black_box(args).interfaces.clear(),
        Err(error) => std::hint::black_box(error.to_string()).clear(),
    }
});
