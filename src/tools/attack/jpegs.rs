//! The hostile JPEG set `vigil attack` streams: frames that once cost a worker gigabytes or
//! seconds, odd codings a decoder may not read, and valid but unusual frames that must still
//! be analysed. Each names the answer Vigil gives it.

use jpeg_encoder::{ColorType, Encoder};

/// One hostile frame and the answer it should get.
pub struct HostileJpeg {
    pub name: &'static str,
    pub bytes: Vec<u8>,
    /// `result`, or `dropped <reason>`.
    pub expect: &'static str,
}

/// A 640x480 picture with detail in it (gradients and a pattern), so that frames are the
/// size of a webcam's.
fn picture(w: u16, h: u16, channels: usize) -> Vec<u8> {
    let (w, h) = (usize::from(w), usize::from(h));
    let mut px = Vec::with_capacity(w * h * channels);
    for y in 0..h {
        for x in 0..w {
            for c in 0..channels {
                let v = (x * (c + 1) + y * (3 - c.min(2)) + ((x / 16 + y / 16) % 2) * 60) % 256;
                px.push(v as u8);
            }
        }
    }
    px
}

fn encode(
    w: u16,
    h: u16,
    color: ColorType,
    setup: impl FnOnce(&mut Encoder<&mut Vec<u8>>),
) -> Vec<u8> {
    let channels = match color {
        ColorType::Luma => 1,
        ColorType::Cmyk | ColorType::Ycck => 4,
        _ => 3,
    };
    let mut out = Vec::new();
    let mut enc = Encoder::new(&mut out, 80);
    setup(&mut enc);
    enc.encode(&picture(w, h, channels), w, h, color)
        .expect("an in-memory JPEG encodes");
    out
}

/// Offset of the first start-of-frame marker (FF C0 or FF C2) of an encoder's output.
fn sof_at(jpeg: &[u8]) -> usize {
    jpeg.windows(2)
        .position(|w| w[0] == 0xFF && matches!(w[1], 0xC0 | 0xC2))
        .expect("the encoder writes a start-of-frame")
}

/// The same frame with its start-of-frame marker and sample precision rewritten.
fn recoded(mut jpeg: Vec<u8>, marker: u8, precision: u8) -> Vec<u8> {
    let at = sof_at(&jpeg);
    jpeg[at + 1] = marker;
    jpeg[at + 4] = precision;
    jpeg
}

/// The same frame declaring another size.
fn declaring(mut jpeg: Vec<u8>, width: u16, height: u16) -> Vec<u8> {
    let at = sof_at(&jpeg);
    jpeg[at + 5..at + 7].copy_from_slice(&height.to_be_bytes());
    jpeg[at + 7..at + 9].copy_from_slice(&width.to_be_bytes());
    jpeg
}

/// A progressive frame whose last scan is repeated until the file holds `scans` scans: each
/// scan makes a decoder pass over the whole image again.
fn with_scans(progressive: Vec<u8>, scans: usize) -> Vec<u8> {
    let last = progressive
        .windows(2)
        .rposition(|w| w == [0xFF, 0xDA])
        .expect("a progressive frame has scans");
    let eoi = progressive.len() - 2;
    let have = progressive
        .windows(2)
        .filter(|w| *w == [0xFF, 0xDA])
        .count();
    let mut out = progressive[..eoi].to_vec();
    for _ in have..scans {
        out.extend_from_slice(&progressive[last..eoi]);
    }
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

/// The header of a grey frame declaring `w` x `h`, with an empty scan: a few hundred bytes.
fn header_only(w: u16, h: u16) -> Vec<u8> {
    let small = encode(8, 8, ColorType::Luma, |_| {});
    let mut jpeg = declaring(small, w, h);
    // Cut the scan data: keep the scan header, then end the image.
    let sos = jpeg
        .windows(2)
        .rposition(|w| w == [0xFF, 0xDA])
        .expect("an encoded JPEG has a start-of-scan marker");
    let len = usize::from(u16::from_be_bytes([jpeg[sos + 2], jpeg[sos + 3]]));
    jpeg.truncate(sos + 2 + len);
    jpeg.extend_from_slice(&[0xFF, 0xD9]);
    jpeg
}

/// The whole set, in the order `vigil attack` streams it.
pub fn set() -> Vec<HostileJpeg> {
    let rgb = encode(640, 480, ColorType::Rgb, |_| {});
    let progressive = encode(640, 480, ColorType::Rgb, |e| e.set_progressive(true));
    // Small, so that 600 scans stay under the edge's frame size limit.
    let small_progressive = encode(320, 240, ColorType::Rgb, |e| e.set_progressive(true));
    let mut garbage = vec![0xFF, 0xD8];
    garbage.extend((0..2000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    vec![
        HostileJpeg {
            name: "declares_23170x23170",
            bytes: header_only(23170, 23170),
            expect: "dropped frame_too_large",
        },
        HostileJpeg {
            name: "declares_4096x4096_in_300_bytes",
            bytes: header_only(4096, 4096),
            expect: "dropped not_jpeg",
        },
        // Enough scan data to pass for 4096x4096: the decoder fills what is missing, so this
        // is the costliest frame within the default limits (16 megapixels decoded).
        HostileJpeg {
            name: "real_frame_declaring_4096x4096",
            bytes: declaring(rgb.clone(), 4096, 4096),
            expect: "result",
        },
        HostileJpeg {
            name: "truncated_at_55_percent",
            bytes: rgb[..rgb.len() * 55 / 100].to_vec(),
            expect: "dropped not_jpeg",
        },
        HostileJpeg {
            name: "progressive_600_scans",
            bytes: with_scans(small_progressive, 600),
            expect: "dropped not_jpeg",
        },
        HostileJpeg {
            name: "twelve_bit",
            bytes: recoded(rgb.clone(), 0xC1, 12),
            expect: "dropped not_jpeg",
        },
        HostileJpeg {
            name: "arithmetic_coded",
            bytes: recoded(rgb.clone(), 0xC9, 8),
            expect: "dropped not_jpeg",
        },
        HostileJpeg {
            name: "lossless",
            bytes: recoded(rgb.clone(), 0xC3, 8),
            expect: "dropped not_jpeg",
        },
        HostileJpeg {
            name: "garbage_after_soi",
            bytes: garbage,
            expect: "dropped not_jpeg",
        },
        HostileJpeg {
            name: "progressive",
            bytes: progressive,
            expect: "result",
        },
        HostileJpeg {
            name: "cmyk",
            bytes: encode(640, 480, ColorType::Cmyk, |_| {}),
            expect: "result",
        },
        HostileJpeg {
            name: "restart_marker_every_mcu",
            bytes: encode(640, 480, ColorType::Rgb, |e| e.set_restart_interval(1)),
            expect: "result",
        },
        HostileJpeg {
            name: "grey",
            bytes: encode(640, 480, ColorType::Luma, |_| {}),
            expect: "result",
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::jpeg;

    #[test]
    fn every_hostile_frame_is_what_it_says() {
        for h in set() {
            let surveyed = jpeg::survey(&h.bytes, 64);
            match h.name {
                "declares_23170x23170" => {
                    assert_eq!(jpeg::info(&h.bytes).unwrap().width, 23170);
                    assert!(h.bytes.len() < 400, "{}", h.bytes.len());
                }
                "progressive_600_scans" => {
                    assert!(h.bytes.len() < 512 * 1024, "{}", h.bytes.len());
                    assert_eq!(
                        jpeg::survey(&h.bytes, 1000).unwrap().scans,
                        600,
                        "{}",
                        h.name
                    );
                    assert_eq!(surveyed.unwrap_err().kind(), "too_many_scans");
                }
                "real_frame_declaring_4096x4096" => {
                    assert_eq!(surveyed.unwrap().info.pixels(), 4096 * 4096);
                }
                _ if h.expect == "result" => {
                    let s = surveyed.unwrap_or_else(|e| panic!("{}: {e}", h.name));
                    assert_eq!((s.info.width, s.info.height), (640, 480), "{}", h.name);
                    crate::inference::imageops::decode_jpeg(&h.bytes)
                        .unwrap_or_else(|e| panic!("{}: {e}", h.name));
                }
                _ => assert!(surveyed.is_err(), "{} passed the survey", h.name),
            }
        }
    }
}
