//! The JPEG container, as far as the transport needs it.
//!
//! - [`info`] walks the markers up to the start-of-frame, which declares the image's size and
//!   coding before a single pixel is decoded. The edge refuses frames whose declared size is
//!   over its limit, or whose coding Vigil does not decode, before they reach the broker.
//! - [`survey`] walks the whole file, entropy-coded data included, in one pass without
//!   decoding: the worker refuses a frame with too many scans (progressive files can make a
//!   decoder pass over the whole image once per scan), one that ends before its end-of-image
//!   marker, and one whose scan data is too short to code the pixels it declares (a few
//!   hundred bytes declaring 16 megapixels), before it allocates anything.

/// Facts from a JPEG's start-of-frame segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegInfo {
    pub width: u16,
    pub height: u16,
    pub components: u8,
    /// Bits per sample: 8 for nearly every JPEG; 12 and 16 exist (medical, lossless).
    pub precision: u8,
    pub coding: Coding,
    /// Minimum coded units: every one of them costs at least one bit of scan data.
    pub mcus: u64,
}

/// How the frame is coded, from its start-of-frame marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// SOF0.
    Baseline,
    /// SOF1: sequential, Huffman, up to 4 tables.
    ExtendedSequential,
    /// SOF2: progressive, Huffman.
    Progressive,
    /// SOF3.
    Lossless,
    /// SOF5..7 and SOF13..15.
    Hierarchical,
    /// SOF9..11.
    Arithmetic,
}

impl Coding {
    fn of(marker: u8) -> Self {
        match marker {
            0xC0 => Coding::Baseline,
            0xC1 => Coding::ExtendedSequential,
            0xC2 => Coding::Progressive,
            0xC3 => Coding::Lossless,
            0xC5..=0xC7 | 0xCD..=0xCF => Coding::Hierarchical,
            _ => Coding::Arithmetic,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Coding::Baseline => "baseline",
            Coding::ExtendedSequential => "extended sequential",
            Coding::Progressive => "progressive",
            Coding::Lossless => "lossless",
            Coding::Hierarchical => "hierarchical",
            Coding::Arithmetic => "arithmetic-coded",
        }
    }
}

/// Why a frame is not a JPEG Vigil reads. Every kind is answered to the client as `not_jpeg`
/// with this text, and counted by its [`kind`](JpegError::kind).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JpegError {
    #[error("{0}")]
    Malformed(String),
    #[error("truncated: {0}")]
    Truncated(String),
    #[error("unsupported JPEG: {0}; send an 8-bit baseline or progressive JPEG")]
    Unsupported(String),
    #[error("more than {limit} scans, the limit")]
    TooManyScans { limit: u32 },
}

impl JpegError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            JpegError::Malformed(_) => "malformed",
            JpegError::Truncated(_) => "truncated",
            JpegError::Unsupported(_) => "unsupported",
            JpegError::TooManyScans { .. } => "too_many_scans",
        }
    }
}

fn malformed(m: impl Into<String>) -> JpegError {
    JpegError::Malformed(m.into())
}

/// Where the marker walk is, and what it found so far.
struct Walk<'a> {
    data: &'a [u8],
    i: usize,
}

/// One marker segment.
struct Segment<'a> {
    marker: u8,
    body: &'a [u8],
}

impl<'a> Walk<'a> {
    fn new(data: &'a [u8]) -> Result<Self, JpegError> {
        if !data.starts_with(&[0xFF, 0xD8]) {
            return Err(malformed("missing start-of-image marker FF D8"));
        }
        Ok(Self { data, i: 2 })
    }

    /// The next marker and its segment; `body` is empty for standalone markers. Never reads
    /// past the buffer.
    fn next(&mut self) -> Result<Segment<'a>, JpegError> {
        let data = self.data;
        if self.i >= data.len() {
            return Err(JpegError::Truncated("no end-of-image marker".into()));
        }
        if data[self.i] != 0xFF {
            return Err(malformed(format!("expected a marker at byte {}", self.i)));
        }
        // Markers may be preceded by any number of 0xFF fill bytes.
        while self.i < data.len() && data[self.i] == 0xFF {
            self.i += 1;
        }
        let Some(&marker) = data.get(self.i) else {
            return Err(JpegError::Truncated("ends inside a marker".into()));
        };
        self.i += 1;
        match marker {
            // Standalone markers: TEM, RST0..7, SOI, EOI carry no length.
            0x01 | 0xD0..=0xD9 => {
                return Ok(Segment { marker, body: &[] });
            }
            0x00 => {
                return Err(malformed(format!(
                    "stuffed byte where a marker belongs at {}",
                    self.i
                )));
            }
            _ => {}
        }
        let Some(len_bytes) = data.get(self.i..self.i + 2) else {
            return Err(JpegError::Truncated("ends inside a segment length".into()));
        };
        let len = u16::from_be_bytes([len_bytes[0], len_bytes[1]]) as usize;
        if len < 2 {
            return Err(malformed(format!("segment {marker:#04x} length {len}")));
        }
        if self.i + len > data.len() {
            return Err(JpegError::Truncated(format!(
                "segment {marker:#04x} of {len} bytes runs past the end"
            )));
        }
        let body = &data[self.i + 2..self.i + len];
        self.i += len;
        Ok(Segment { marker, body })
    }

    /// Skip the entropy-coded data after a scan header, up to the next marker that is not a
    /// stuffed zero or a restart marker; returns how many bytes were skipped.
    fn skip_entropy_data(&mut self) -> usize {
        let start = self.i;
        let data = self.data;
        while self.i + 1 < data.len() {
            if data[self.i] == 0xFF {
                match data[self.i + 1] {
                    0x00 | 0xD0..=0xD7 => self.i += 2,
                    // Fill bytes before a marker.
                    0xFF => self.i += 1,
                    _ => return self.i - start,
                }
            } else {
                self.i += 1;
            }
        }
        self.i = data.len();
        self.i - start
    }
}

fn is_sof(marker: u8) -> bool {
    matches!(marker, 0xC0..=0xCF) && !matches!(marker, 0xC4 | 0xC8 | 0xCC)
}

fn frame_info(marker: u8, seg: &[u8]) -> Result<JpegInfo, JpegError> {
    if seg.len() < 6 {
        return Err(malformed("start-of-frame segment too short"));
    }
    let precision = seg[0];
    let height = u16::from_be_bytes([seg[1], seg[2]]);
    let width = u16::from_be_bytes([seg[3], seg[4]]);
    let components = seg[5];
    if width == 0 || height == 0 || components == 0 {
        return Err(malformed(format!(
            "degenerate frame {width}x{height} with {components} components"
        )));
    }
    let specs = seg.get(6..6 + 3 * components as usize).ok_or_else(|| {
        malformed(format!(
            "start-of-frame declares {components} components it does not describe"
        ))
    })?;
    let (mut h_max, mut v_max) = (1u64, 1u64);
    for spec in specs.chunks_exact(3) {
        let (h, v) = (u64::from(spec[1] >> 4), u64::from(spec[1] & 0x0F));
        if !(1..=4).contains(&h) || !(1..=4).contains(&v) {
            return Err(malformed(format!("sampling factors {h}x{v} out of 1..4")));
        }
        h_max = h_max.max(h);
        v_max = v_max.max(v);
    }
    let mcus = u64::from(width).div_ceil(8 * h_max) * u64::from(height).div_ceil(8 * v_max);
    Ok(JpegInfo {
        width,
        height,
        components,
        precision,
        coding: Coding::of(marker),
        mcus,
    })
}

/// Walk the JPEG markers up to the first start-of-frame and read what it declares.
pub fn info(data: &[u8]) -> Result<JpegInfo, JpegError> {
    let mut walk = Walk::new(data)?;
    loop {
        let seg = walk.next()?;
        match seg.marker {
            0xD8 => return Err(malformed("second start-of-image marker")),
            0xD9 => return Err(malformed("end of image before start-of-frame")),
            0xDA => return Err(malformed("scan data before start-of-frame")),
            m if is_sof(m) => return frame_info(m, seg.body),
            _ => {}
        }
    }
}

/// The whole file, walked: its frame, and what its scans hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Survey {
    pub info: JpegInfo,
    pub scans: u32,
    /// Bytes of entropy-coded data, in all scans.
    pub scan_bytes: u64,
}

/// Walk the whole file without decoding, and refuse what a decoder should never be given:
/// a coding Vigil does not decode, more than `max_scans` scans, a file that ends before its
/// end-of-image marker, and scan data too short to code the declared pixels (each minimum
/// coded unit takes at least one bit). Bytes after the end-of-image marker are ignored, as
/// decoders do.
pub fn survey(data: &[u8], max_scans: u32) -> Result<Survey, JpegError> {
    let mut walk = Walk::new(data)?;
    let mut info = None;
    let (mut scans, mut scan_bytes) = (0u32, 0u64);
    loop {
        let seg = walk.next()?;
        match seg.marker {
            0xD8 => return Err(malformed("second start-of-image marker")),
            0xD9 => break,
            0xDA => {
                let Some(info) = info else {
                    return Err(malformed("scan data before start-of-frame"));
                };
                check_supported(&info)?;
                scans += 1;
                if scans > max_scans {
                    return Err(JpegError::TooManyScans { limit: max_scans });
                }
                scan_bytes += walk.skip_entropy_data() as u64;
            }
            m if is_sof(m) => {
                if info.is_some() {
                    return Err(malformed("a second start-of-frame"));
                }
                info = Some(frame_info(m, seg.body)?);
            }
            _ => {}
        }
    }
    let info = info.ok_or_else(|| malformed("end of image before start-of-frame"))?;
    if scans == 0 {
        return Err(JpegError::Truncated("no scan data".into()));
    }
    if scan_bytes * 8 < info.mcus {
        return Err(JpegError::Truncated(format!(
            "{scan_bytes} bytes of scan data cannot code {}x{} pixels",
            info.width, info.height
        )));
    }
    Ok(Survey {
        info,
        scans,
        scan_bytes,
    })
}

/// Refuse codings Vigil's decoder does not read, by name, so the client knows what to send.
pub fn check_supported(info: &JpegInfo) -> Result<(), JpegError> {
    if info.precision != 8 {
        return Err(JpegError::Unsupported(format!(
            "{}-bit samples",
            info.precision
        )));
    }
    if !matches!(
        info.coding,
        Coding::Baseline | Coding::ExtendedSequential | Coding::Progressive
    ) {
        return Err(JpegError::Unsupported(format!(
            "{} coding",
            info.coding.as_str()
        )));
    }
    if !matches!(info.components, 1 | 3 | 4) {
        return Err(JpegError::Unsupported(format!(
            "{} colour components",
            info.components
        )));
    }
    Ok(())
}

impl JpegInfo {
    /// Pixels the frame declares.
    pub fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jpeg_encoder::{ColorType, Encoder};

    fn encode(
        w: u16,
        h: u16,
        color: ColorType,
        setup: impl Fn(&mut Encoder<&mut Vec<u8>>),
    ) -> Vec<u8> {
        let channels = match color {
            ColorType::Luma => 1,
            ColorType::Cmyk | ColorType::Ycck => 4,
            _ => 3,
        };
        let pixels: Vec<u8> = (0..usize::from(w) * usize::from(h) * channels)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let mut out = Vec::new();
        let mut enc = Encoder::new(&mut out, 80);
        setup(&mut enc);
        enc.encode(&pixels, w, h, color).unwrap();
        out
    }

    #[test]
    fn surveys_the_codings_the_decoder_reads() {
        let baseline = encode(64, 48, ColorType::Rgb, |_| {});
        let s = survey(&baseline, 64).unwrap();
        assert_eq!(
            (s.info.width, s.info.height, s.info.components),
            (64, 48, 3)
        );
        assert_eq!(
            (s.info.coding, s.info.precision, s.scans),
            (Coding::Baseline, 8, 1)
        );
        let progressive = encode(64, 48, ColorType::Rgb, |e| e.set_progressive(true));
        let s = survey(&progressive, 64).unwrap();
        assert_eq!(s.info.coding, Coding::Progressive);
        assert!(s.scans > 1, "{s:?}");
        let restarts = encode(64, 48, ColorType::Rgb, |e| e.set_restart_interval(1));
        assert_eq!(survey(&restarts, 64).unwrap().scans, 1);
        let cmyk = encode(64, 48, ColorType::Cmyk, |_| {});
        assert_eq!(survey(&cmyk, 64).unwrap().info.components, 4);
        let grey = encode(64, 48, ColorType::Luma, |_| {});
        assert_eq!(survey(&grey, 64).unwrap().info.components, 1);
        // Bytes after the end of the image are ignored.
        let mut trailing = baseline.clone();
        trailing.extend_from_slice(b"trailing bytes");
        assert!(survey(&trailing, 64).is_ok());
    }

    #[test]
    fn refuses_too_many_scans() {
        let progressive = encode(64, 48, ColorType::Rgb, |e| e.set_progressive(true));
        let scans = survey(&progressive, 64).unwrap().scans;
        let err = survey(&progressive, scans - 1).unwrap_err();
        assert_eq!(err.kind(), "too_many_scans", "{err}");
    }

    #[test]
    fn every_cut_of_a_frame_is_refused() {
        let full = encode(64, 48, ColorType::Rgb, |e| e.set_restart_interval(2));
        for cut in 0..full.len() - 1 {
            assert!(survey(&full[..cut], 64).is_err(), "cut at {cut} accepted");
        }
    }

    /// The precision byte and marker of the start-of-frame, rewritten.
    fn with_frame(mut jpeg: Vec<u8>, marker: u8, precision: u8) -> Vec<u8> {
        let at = jpeg
            .windows(2)
            .position(|w| w[0] == 0xFF && w[1] == 0xC0)
            .unwrap();
        jpeg[at + 1] = marker;
        jpeg[at + 4] = precision;
        jpeg
    }

    #[test]
    fn names_the_codings_it_does_not_read() {
        let base = encode(64, 48, ColorType::Rgb, |_| {});
        for (marker, precision, want) in [
            (0xC1, 12, "12-bit samples"),
            (0xC3, 8, "lossless coding"),
            (0xC9, 8, "arithmetic-coded coding"),
            (0xC5, 8, "hierarchical coding"),
        ] {
            let odd = with_frame(base.clone(), marker, precision);
            let header = info(&odd).unwrap();
            let err = check_supported(&header).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
            assert_eq!(survey(&odd, 64).unwrap_err().to_string(), err);
        }
    }

    #[test]
    fn refuses_scan_data_too_short_for_the_declared_size() {
        // A small real frame whose header claims 4096x4096: its scan data cannot code that.
        let small = encode(64, 48, ColorType::Rgb, |_| {});
        let mut bomb = small.clone();
        let at = bomb
            .windows(2)
            .position(|w| w[0] == 0xFF && w[1] == 0xC0)
            .unwrap();
        bomb[at + 5..at + 9].copy_from_slice(&[0x10, 0x00, 0x10, 0x00]);
        assert_eq!(info(&bomb).unwrap().pixels(), 4096 * 4096);
        let err = survey(&bomb, 64).unwrap_err();
        assert_eq!(err.kind(), "truncated", "{err}");
    }
}
