//! Pixel operations for the model stack: decode, resize to fit, pad, crop, and the
//! similarity warp that aligns a face. All on `image::RgbImage`, producing NCHW `f32` tensors.

use image::{RgbImage, imageops};

use super::InferenceError;

/// Most pixels [`decode_jpeg`] accepts (16 megapixels). Callers with their own limit use
/// [`decode_jpeg_limited`].
pub const DEFAULT_MAX_PIXELS: u64 = 16 * 1024 * 1024;

/// [`decode_jpeg_limited`] with [`DEFAULT_MAX_PIXELS`].
pub fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, InferenceError> {
    decode_jpeg_limited(bytes, DEFAULT_MAX_PIXELS)
}

/// Decode a JPEG into RGB, upright: the EXIF orientation (a phone photo taken sideways says
/// so in its metadata) is applied, so faces are analysed the way a person sees the photo.
///
/// A JPEG of a few hundred bytes can declare 23170x23170 pixels, gigabytes once decoded to
/// RGB: the declared size is checked against `max_pixels` before anything is allocated, and
/// the decoder itself runs with that limit.
pub fn decode_jpeg_limited(bytes: &[u8], max_pixels: u64) -> Result<RgbImage, InferenceError> {
    use image::ImageDecoder as _;
    let bad = |e: image::ImageError| InferenceError::BadImage(e.to_string());
    let info =
        vigil_core::wire::jpeg::info(bytes).map_err(|e| InferenceError::BadImage(e.to_string()))?;
    vigil_core::wire::jpeg::check_supported(&info)
        .map_err(|e| InferenceError::BadImage(e.to_string()))?;
    if info.pixels() > max_pixels {
        return Err(InferenceError::BadImage(format!(
            "the image declares {}x{} = {} pixels, over the limit of {max_pixels}",
            info.width,
            info.height,
            info.pixels()
        )));
    }
    let mut decoder =
        image::codecs::jpeg::JpegDecoder::new(std::io::Cursor::new(bytes)).map_err(bad)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(info.width as u32);
    limits.max_image_height = Some(info.height as u32);
    // The RGB image, and the decoder's own buffers (at most as large again).
    limits.max_alloc = Some(max_pixels * 3 * 2);
    decoder.set_limits(limits).map_err(bad)?;
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = image::DynamicImage::from_decoder(decoder).map_err(bad)?;
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// Grey levels (BT.601 luma) of an RGB image, row-major.
pub fn luma(img: &RgbImage) -> Vec<f32> {
    img.pixels()
        .map(|p| 0.299 * p.0[0] as f32 + 0.587 * p.0[1] as f32 + 0.114 * p.0[2] as f32)
        .collect()
}

/// An aligned face's appearance for the still test: its grey levels pooled in square blocks
/// to [`APPEARANCE_SIDE`](vigil_core::wire::APPEARANCE_SIDE) cells a side, less their mean (so
/// that the light's level does not count). Cheap: no model runs.
pub fn appearance(aligned: &RgbImage) -> Vec<f32> {
    let n = vigil_core::wire::APPEARANCE_SIDE;
    let (w, h) = aligned.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut cells = vec![0f32; n * n];
    if w < n || h < n {
        return cells;
    }
    let luma = luma(aligned);
    for y in 0..h {
        let cy = (y * n / h).min(n - 1);
        for x in 0..w {
            cells[cy * n + (x * n / w).min(n - 1)] += luma[y * w + x];
        }
    }
    let mean = cells.iter().sum::<f32>() / cells.len() as f32;
    cells.iter_mut().for_each(|c| *c -= mean);
    cells
}

/// Mean and Laplacian variance (4-neighbour) of the grey levels inside `x0..x1` x `y0..y1`.
/// The Laplacian's variance is the usual focus measure: a blurred face has little of it.
pub fn mean_and_laplacian_variance(
    grey: &[f32],
    width: usize,
    (x0, x1): (usize, usize),
    (y0, y1): (usize, usize),
) -> (f32, f32) {
    let (mut sum, mut n) = (0f64, 0f64);
    let (mut lsum, mut lsq, mut ln) = (0f64, 0f64, 0f64);
    for y in y0..y1 {
        for x in x0..x1 {
            let v = grey[y * width + x] as f64;
            sum += v;
            n += 1.0;
            if x > x0 && y > y0 && x + 1 < x1 && y + 1 < y1 {
                let lap = grey[(y - 1) * width + x] as f64
                    + grey[(y + 1) * width + x] as f64
                    + grey[y * width + x - 1] as f64
                    + grey[y * width + x + 1] as f64
                    - 4.0 * v;
                lsum += lap;
                lsq += lap * lap;
                ln += 1.0;
            }
        }
    }
    if n == 0.0 || ln == 0.0 {
        return (0.0, 0.0);
    }
    let lmean = lsum / ln;
    ((sum / n) as f32, (lsq / ln - lmean * lmean) as f32)
}

/// Scale `img` so that it fits in `max` x `max` (never upscaling). Returns the image and the
/// factor from original to scaled coordinates.
pub fn fit_within(img: &RgbImage, max: u32) -> (RgbImage, f32) {
    let (w, h) = img.dimensions();
    let scale = (max as f32 / w as f32).min(max as f32 / h as f32).min(1.0);
    if scale >= 1.0 {
        return (img.clone(), 1.0);
    }
    let (nw, nh) = (
        ((w as f32 * scale).round() as u32).max(1),
        ((h as f32 * scale).round() as u32).max(1),
    );
    (
        imageops::resize(img, nw, nh, imageops::FilterType::Triangle),
        scale,
    )
}

/// `img` padded with zeros on the right and bottom to the next multiple of `multiple` on each
/// side, as BGR planes in 0..255 (YuNet's input). Returns the planes and their width and height.
pub fn padded_bgr_nchw(img: &RgbImage, multiple: u32) -> (Vec<f32>, usize, usize) {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let m = multiple.max(1) as usize;
    let (pw, ph) = (w.div_ceil(m).max(1) * m, h.div_ceil(m).max(1) * m);
    let plane = pw * ph;
    let mut out = vec![0f32; 3 * plane];
    for (x, y, p) in img.enumerate_pixels() {
        let i = y as usize * pw + x as usize;
        out[i] = p.0[2] as f32;
        out[plane + i] = p.0[1] as f32;
        out[2 * plane + i] = p.0[0] as f32;
    }
    (out, pw, ph)
}

/// RGB planes in 0..255 (SFace and the liveness model).
pub fn rgb_nchw(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let plane = (w * h) as usize;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in img.pixels().enumerate() {
        out[i] = p.0[0] as f32;
        out[plane + i] = p.0[1] as f32;
        out[2 * plane + i] = p.0[2] as f32;
    }
    out
}

/// Crop the `w` x `h` rectangle whose top-left corner is (`x`, `y`) and stretch it to
/// `out` x `out`. The rectangle must lie inside the image.
pub fn crop_resize(img: &RgbImage, x: u32, y: u32, w: u32, h: u32, out: u32) -> RgbImage {
    let view = imageops::crop_imm(img, x, y, w.max(1), h.max(1)).to_image();
    imageops::resize(&view, out, out, imageops::FilterType::Triangle)
}

/// A 2-D similarity transform `p' = [[a, -b], [b, a]] p + t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Similarity {
    pub a: f32,
    pub b: f32,
    pub tx: f32,
    pub ty: f32,
}

impl Similarity {
    /// The least-squares similarity mapping `src` points onto `dst` (Umeyama, without
    /// reflection), as OpenCV's face alignment estimates it.
    pub fn estimate(src: &[(f32, f32)], dst: &[(f32, f32)]) -> Option<Self> {
        let n = src.len().min(dst.len()) as f32;
        if n < 2.0 {
            return None;
        }
        let mean = |pts: &[(f32, f32)]| {
            let (sx, sy) = pts
                .iter()
                .fold((0.0, 0.0), |(ax, ay), (x, y)| (ax + x, ay + y));
            (sx / n, sy / n)
        };
        let (mpx, mpy) = mean(src);
        let (mqx, mqy) = mean(dst);
        let (mut num_a, mut num_b, mut norm) = (0f32, 0f32, 0f32);
        for ((px, py), (qx, qy)) in src.iter().zip(dst) {
            let (px, py, qx, qy) = (px - mpx, py - mpy, qx - mqx, qy - mqy);
            num_a += px * qx + py * qy;
            num_b += px * qy - py * qx;
            norm += px * px + py * py;
        }
        if norm <= f32::EPSILON {
            return None;
        }
        let (a, b) = (num_a / norm, num_b / norm);
        Some(Self {
            a,
            b,
            tx: mqx - (a * mpx - b * mpy),
            ty: mqy - (b * mpx + a * mpy),
        })
    }

    pub fn apply(&self, (x, y): (f32, f32)) -> (f32, f32) {
        (
            self.a * x - self.b * y + self.tx,
            self.b * x + self.a * y + self.ty,
        )
    }

    fn inverse(&self) -> Option<Self> {
        let det = self.a * self.a + self.b * self.b;
        if det <= f32::EPSILON {
            return None;
        }
        let (a, b) = (self.a / det, -self.b / det);
        Some(Self {
            a,
            b,
            tx: -(a * self.tx - b * self.ty),
            ty: -(b * self.tx + a * self.ty),
        })
    }
}

/// Warp `img` by `m` into a `size` x `size` image with bilinear sampling; outside is black.
pub fn warp(img: &RgbImage, m: &Similarity, size: u32) -> RgbImage {
    let inv = m.inverse().unwrap_or(Similarity {
        a: 1.0,
        b: 0.0,
        tx: 0.0,
        ty: 0.0,
    });
    let (w, h) = img.dimensions();
    let mut out = RgbImage::new(size, size);
    for v in 0..size {
        for u in 0..size {
            let (sx, sy) = inv.apply((u as f32, v as f32));
            let (x0, y0) = (sx.floor(), sy.floor());
            let (fx, fy) = (sx - x0, sy - y0);
            let mut acc = [0f32; 3];
            for (dx, dy, wgt) in [
                (0, 0, (1.0 - fx) * (1.0 - fy)),
                (1, 0, fx * (1.0 - fy)),
                (0, 1, (1.0 - fx) * fy),
                (1, 1, fx * fy),
            ] {
                let (x, y) = (x0 as i64 + dx, y0 as i64 + dy);
                if x >= 0 && y >= 0 && (x as u32) < w && (y as u32) < h {
                    let p = img.get_pixel(x as u32, y as u32).0;
                    for c in 0..3 {
                        acc[c] += wgt * p[c] as f32;
                    }
                }
            }
            out.put_pixel(
                u,
                v,
                image::Rgb(acc.map(|c| c.round().clamp(0.0, 255.0) as u8)),
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_appearance_ignores_the_lights_level_and_sees_a_change() {
        // A face-sized gradient with a darker band (the eyes).
        let face = RgbImage::from_fn(112, 112, |x, y| {
            let v = (60 + x / 2 + y / 3) as u8 - if (40..56).contains(&y) { 40 } else { 0 };
            image::Rgb([v, v, v])
        });
        let a = appearance(&face);
        assert_eq!(a.len(), vigil_core::wire::APPEARANCE_BYTES);
        assert!(
            a.iter().sum::<f32>().abs() < 1e-2 * a.len() as f32,
            "its mean is removed"
        );
        // The same face under more light: the same appearance.
        let lit = RgbImage::from_fn(112, 112, |x, y| {
            let p = face.get_pixel(x, y).0[0] + 30;
            image::Rgb([p, p, p])
        });
        let b = appearance(&lit);
        assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-2));
        // The eyes closed (the band gone): a different one.
        let closed = RgbImage::from_fn(112, 112, |x, y| {
            let v = (60 + x / 2 + y / 3) as u8;
            image::Rgb([v, v, v])
        });
        let c = appearance(&closed);
        let unit = |v: &[f32]| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n).collect::<Vec<_>>()
        };
        let cos: f32 = unit(&a).iter().zip(unit(&c)).map(|(x, y)| x * y).sum();
        assert!(cos < 0.9, "cosine {cos}");
        // Too small to pool: all zero (unpacked, no appearance at all).
        assert!(appearance(&RgbImage::new(10, 10)).iter().all(|v| *v == 0.0));
        assert!(
            vigil_core::wire::unpack_appearance(&vigil_core::wire::pack_appearance(&appearance(
                &RgbImage::new(10, 10)
            )))
            .is_none()
        );
    }

    #[test]
    fn similarity_recovers_a_known_transform() {
        let truth = Similarity {
            a: 0.8,
            b: 0.3,
            tx: 5.0,
            ty: -2.0,
        };
        let src = [
            (10.0, 20.0),
            (50.0, 22.0),
            (30.0, 40.0),
            (15.0, 60.0),
            (45.0, 61.0),
        ];
        let dst: Vec<_> = src.iter().map(|p| truth.apply(*p)).collect();
        let m = Similarity::estimate(&src, &dst).unwrap();
        for (x, y) in [
            (m.a, truth.a),
            (m.b, truth.b),
            (m.tx, truth.tx),
            (m.ty, truth.ty),
        ] {
            assert!((x - y).abs() < 1e-3, "{m:?}");
        }
        let back = m.inverse().unwrap().apply(m.apply((7.0, 9.0)));
        assert!((back.0 - 7.0).abs() < 1e-3 && (back.1 - 9.0).abs() < 1e-3);
    }

    #[test]
    fn padding_rounds_each_side_up_and_swaps_channels() {
        let img = RgbImage::from_pixel(5, 2, image::Rgb([10, 20, 30]));
        let (t, w, h) = padded_bgr_nchw(&img, 4);
        assert_eq!((w, h, t.len()), (8, 4, 96));
        assert_eq!((t[0], t[32], t[64]), (30.0, 20.0, 10.0));
        assert_eq!((t[4], t[5], t[8 + 4], t[16]), (30.0, 0.0, 30.0, 0.0)); // padding
        let (t, w, h) = padded_bgr_nchw(&RgbImage::new(8, 4), 4);
        assert_eq!((w, h, t.len()), (8, 4, 96));
    }

    #[test]
    fn laplacian_variance_falls_when_an_image_is_blurred() {
        // A checkerboard is all edges; its box-blurred copy is nearly flat.
        let sharp: Vec<f32> = (0..64 * 64)
            .map(|i| {
                if (i % 64 / 4 + i / 64 / 4) % 2 == 0 {
                    40.0
                } else {
                    200.0
                }
            })
            .collect();
        let blurred: Vec<f32> = (0..64 * 64)
            .map(|i| {
                let (x, y) = ((i % 64) as i64, (i / 64) as i64);
                let mut acc = 0.0;
                for dy in -4..=4i64 {
                    for dx in -4..=4i64 {
                        let (sx, sy) = ((x + dx).clamp(0, 63), (y + dy).clamp(0, 63));
                        acc += sharp[(sy * 64 + sx) as usize];
                    }
                }
                acc / 81.0
            })
            .collect();
        let (m1, v1) = mean_and_laplacian_variance(&sharp, 64, (0, 64), (0, 64));
        let (m2, v2) = mean_and_laplacian_variance(&blurred, 64, (0, 64), (0, 64));
        assert!(
            (m1 - 120.0).abs() < 1.0 && (m2 - 120.0).abs() < 5.0,
            "{m1} {m2}"
        );
        assert!(v1 > 20.0 * v2, "sharp {v1} vs blurred {v2}");
    }

    #[test]
    fn a_tiny_jpeg_that_declares_a_huge_image_is_refused_before_decoding() {
        // SOI, SOF0 declaring 23170x23170 grey, EOI: 21 bytes that would be 1.6 GB in RGB.
        let bomb: &[u8] = &[
            0xFF, 0xD8, 0xFF, 0xC0, 0x00, 0x0B, 0x08, 0x5A, 0x82, 0x5A, 0x82, 0x01, 0x01, 0x11,
            0x00, 0xFF, 0xD9,
        ];
        let err = decode_jpeg(bomb).unwrap_err().to_string();
        assert!(
            err.contains("23170x23170") && err.contains("over the limit"),
            "{err}"
        );
        // A real frame under the limit still decodes, and one over a lower limit does not.
        let img = RgbImage::from_pixel(64, 48, image::Rgb([1, 2, 3]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
            .encode_image(&img)
            .unwrap();
        assert_eq!(decode_jpeg(&jpeg).unwrap().dimensions(), (64, 48));
        assert!(decode_jpeg_limited(&jpeg, 64 * 47).is_err());
    }

    #[test]
    fn exif_orientation_is_applied() {
        // A 4x2 JPEG that says "rotate 90 degrees clockwise" (orientation 6) decodes as 2x4.
        let img = RgbImage::from_pixel(4, 2, image::Rgb([120, 130, 140]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut jpeg)
            .encode_image(&img)
            .unwrap();
        // APP1 "Exif\0\0", little-endian TIFF with one IFD entry: 0x0112 SHORT 1 = 6.
        let tiff: &[u8] = &[
            b'I', b'I', 42, 0, 8, 0, 0, 0, 1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0, 0,
            0,
        ];
        let mut app1 = vec![0xFF, 0xE1];
        app1.extend_from_slice(&((2 + 6 + tiff.len()) as u16).to_be_bytes());
        app1.extend_from_slice(b"Exif\0\0");
        app1.extend_from_slice(tiff);
        let mut rotated = jpeg[..2].to_vec();
        rotated.extend_from_slice(&app1);
        rotated.extend_from_slice(&jpeg[2..]);
        assert_eq!(decode_jpeg(&jpeg).unwrap().dimensions(), (4, 2));
        assert_eq!(decode_jpeg(&rotated).unwrap().dimensions(), (2, 4));
    }

    #[test]
    fn fit_within_never_upscales() {
        let img = RgbImage::new(100, 50);
        let (small, s) = fit_within(&img, 40);
        assert_eq!((small.dimensions(), s), ((40, 20), 0.4));
        let (same, s) = fit_within(&img, 640);
        assert_eq!((same.dimensions(), s), ((100, 50), 1.0));
    }
}
