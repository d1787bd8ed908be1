//! Everything a client can send the edge, as text or binary: parsing never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vigil::wire::client::parse_binary(&bytes::Bytes::copy_from_slice(data));
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = vigil::wire::client::parse_text(text);
    }
});
