//! The JPEG container, as far as the transport needs it: a marker walk to the start-of-frame,
//! which declares the image's size before a single pixel is decoded. The edge refuses frames
//! whose declared size is over its limit, and the worker checks again before it decodes.

/// Facts from a JPEG's start-of-frame segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegInfo {
    pub width: u16,
    pub height: u16,
    pub components: u8,
}

/// Walk the JPEG markers up to the first start-of-frame (SOF0..SOF15 except DHT, JPG, DAC)
/// and read its dimensions. Never reads past the buffer.
pub fn info(data: &[u8]) -> Result<JpegInfo, String> {
    let bad = |m: &str| m.to_owned();
    if !data.starts_with(&[0xFF, 0xD8]) {
        return Err(bad("missing start-of-image marker FF D8"));
    }
    let mut i = 2;
    loop {
        // Markers may be preceded by any number of 0xFF fill bytes.
        if i >= data.len() || data[i] != 0xFF {
            return Err(bad(&format!("expected a marker at byte {i}")));
        }
        while i < data.len() && data[i] == 0xFF {
            i += 1;
        }
        let Some(&marker) = data.get(i) else {
            return Err(bad("truncated before start-of-frame"));
        };
        i += 1;
        match marker {
            // Standalone markers: TEM, RST0..7 carry no length.
            0x01 | 0xD0..=0xD7 => continue,
            0xD8 => return Err(bad("second start-of-image marker")),
            0xD9 => return Err(bad("end of image before start-of-frame")),
            0xDA => return Err(bad("scan data before start-of-frame")),
            0x00 => return Err(bad(&format!("stuffed byte where a marker belongs at {i}"))),
            _ => {}
        }
        let Some(len_bytes) = data.get(i..i + 2) else {
            return Err(bad("truncated segment length"));
        };
        let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
        if len < 2 || i + len > data.len() {
            return Err(bad(&format!(
                "segment {marker:#04x} length {len} runs past the end"
            )));
        }
        let is_sof = matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC);
        if is_sof {
            let seg = &data[i + 2..i + len];
            if seg.len() < 6 {
                return Err(bad("start-of-frame segment too short"));
            }
            let height = u16::from_be_bytes([seg[1], seg[2]]);
            let width = u16::from_be_bytes([seg[3], seg[4]]);
            let components = seg[5];
            if width == 0 || height == 0 || components == 0 {
                return Err(bad(&format!(
                    "degenerate frame {width}x{height} with {components} components"
                )));
            }
            return Ok(JpegInfo {
                width,
                height,
                components,
            });
        }
        i += len;
    }
}

impl JpegInfo {
    /// Pixels the frame declares.
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}
