//! The TOML config parser and validator.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = certmesh::config::Config::parse(std::path::Path::new("fuzz.toml"), text);
    }
});
