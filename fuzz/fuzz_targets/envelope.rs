//! Everything that can arrive on a queue: decoding never panics, and the JPEG marker walk never
//! reads out of bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = vigil::wire::Envelope::decode(data);
    let _ = vigil::analyzer::jpeg_info(data);
});
