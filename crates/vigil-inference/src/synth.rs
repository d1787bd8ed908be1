//! Frames made from real photos for evaluation and tests: a still photo replayed as a
//! stream (as a printed photo or a screen held up to the camera moves), and photos degraded
//! the ways a webcam degrades a face (blur, darkness, distance).

use image::codecs::jpeg::JpegEncoder;
use image::{Rgb, RgbImage, imageops};
use rand::{Rng, SeedableRng};

use super::{InferenceError, imageops as ops};

fn encode(img: &RgbImage, quality: u8) -> Result<Vec<u8>, InferenceError> {
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, quality)
        .encode_image(img)
        .map_err(|e| InferenceError::BadImage(e.to_string()))?;
    Ok(out)
}

/// The 3x3 homography mapping the four `src` corners onto `dst` (direct linear solve).
fn homography(src: &[(f32, f32); 4], dst: &[(f32, f32); 4]) -> Option<[f64; 9]> {
    // Eight equations in h0..h7 (h8 = 1), solved by Gaussian elimination.
    let mut a = [[0f64; 9]; 8];
    for i in 0..4 {
        let (x, y) = (src[i].0 as f64, src[i].1 as f64);
        let (u, v) = (dst[i].0 as f64, dst[i].1 as f64);
        a[2 * i] = [x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y, u];
        a[2 * i + 1] = [0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y, v];
    }
    for col in 0..8 {
        let pivot = (col..8).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        let pivot_row = a[col];
        for (row, r) in a.iter_mut().enumerate() {
            if row != col {
                let f = r[col] / pivot_row[col];
                for (x, p) in r.iter_mut().zip(pivot_row.iter()).skip(col) {
                    *x -= f * p;
                }
            }
        }
    }
    let mut h = [0f64; 9];
    for i in 0..8 {
        h[i] = a[i][8] / a[i][i];
    }
    h[8] = 1.0;
    Some(h)
}

/// `img` seen through the homography `h` (output pixel -> source pixel), edges clamped.
fn warp_perspective(img: &RgbImage, h: &[f64; 9]) -> RgbImage {
    let (w, hh) = img.dimensions();
    RgbImage::from_fn(w, hh, |u, v| {
        let (u, v) = (u as f64, v as f64);
        let z = h[6] * u + h[7] * v + h[8];
        let x = ((h[0] * u + h[1] * v + h[2]) / z).clamp(0.0, (w - 1) as f64);
        let y = ((h[3] * u + h[4] * v + h[5]) / z).clamp(0.0, (hh - 1) as f64);
        let (x0, y0) = (x.floor() as u32, y.floor() as u32);
        let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(hh - 1));
        let (fx, fy) = ((x - x0 as f64) as f32, (y - y0 as f64) as f32);
        let p = |x, y| img.get_pixel(x, y).0.map(|c| c as f32);
        let (a, b, c, d) = (p(x0, y0), p(x1, y0), p(x0, y1), p(x1, y1));
        Rgb(std::array::from_fn(|k| {
            let top = a[k] * (1.0 - fx) + b[k] * fx;
            let bottom = c[k] * (1.0 - fx) + d[k] * fx;
            (top * (1.0 - fy) + bottom * fy).round().clamp(0.0, 255.0) as u8
        }))
    })
}

/// A still photo held up to a camera: `frames` JPEGs of `jpeg` (fitted to 640), each seen
/// through a small random perspective (corners moved by up to `amplitude` of the image
/// size), with a little change of light and sensor noise, re-encoded. `amplitude` 0 gives
/// the same frame every time, byte for byte.
pub fn held_up_photo(
    jpeg: &[u8],
    frames: usize,
    amplitude: f32,
    seed: u64,
) -> Result<Vec<Vec<u8>>, InferenceError> {
    let (img, _) = ops::fit_within(&ops::decode_jpeg(jpeg)?, 640);
    if amplitude <= 0.0 {
        let one = encode(&img, 90)?;
        return Ok(vec![one; frames]);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (w, h) = (img.width() as f32, img.height() as f32);
    let corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)];
    (0..frames)
        .map(|_| {
            let moved = corners.map(|(x, y)| {
                (
                    x + rng.random_range(-amplitude..=amplitude) * w,
                    y + rng.random_range(-amplitude..=amplitude) * h,
                )
            });
            let hm = homography(&moved, &corners).unwrap_or([1., 0., 0., 0., 1., 0., 0., 0., 1.]);
            let mut seen = warp_perspective(&img, &hm);
            let gain: f32 = rng.random_range(0.92..1.08);
            for p in seen.pixels_mut() {
                for c in p.0.iter_mut() {
                    let noise: f32 = rng.random_range(-3.0..3.0);
                    *c = (*c as f32 * gain + noise).round().clamp(0.0, 255.0) as u8;
                }
            }
            encode(&seen, 85)
        })
        .collect()
}

/// A printed photo turned in the hand about its vertical axis by `degrees` (positive: its
/// right edge away from the camera), seen by a pinhole camera `distance` photo-widths away:
/// the projection of a plane, fitted to 640 and re-encoded. What a photo "turning its head"
/// looks like to the camera.
pub fn photo_turned_in_hand(
    jpeg: &[u8],
    degrees: f32,
    distance: f32,
) -> Result<Vec<u8>, InferenceError> {
    let (img, _) = ops::fit_within(&ops::decode_jpeg(jpeg)?, 640);
    let (w, h) = (img.width() as f32, img.height() as f32);
    let (sin, cos) = degrees.to_radians().sin_cos();
    let f = distance * w;
    // A corner at (x, y) on the photo, centred, turned about the vertical axis, projected.
    let project = |x: f32, y: f32| {
        let (cx, cy) = (x - w / 2.0, y - h / 2.0);
        let (xr, zr) = (cx * cos, cx * sin);
        let k = f / (f + zr);
        (w / 2.0 + xr * k, h / 2.0 + cy * k)
    };
    let corners = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)];
    let seen = corners.map(|(x, y)| project(x, y));
    let hm = homography(&seen, &corners)
        .ok_or_else(|| InferenceError::BadImage("degenerate turn".into()))?;
    encode(&warp_perspective(&img, &hm), 90)
}

/// Ways a webcam degrades a face.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degradation {
    /// Out of focus: a Gaussian blur of sigma 6 pixels at 640.
    Blurred,
    /// A dark room: a tenth of the light.
    Dark,
    /// Far from the camera: the frame scaled to 80 pixels wide, on a 640-wide frame.
    Tiny,
}

impl Degradation {
    pub const ALL: [Degradation; 3] = [Degradation::Blurred, Degradation::Dark, Degradation::Tiny];

    pub fn as_str(self) -> &'static str {
        match self {
            Degradation::Blurred => "blurred",
            Degradation::Dark => "dark",
            Degradation::Tiny => "tiny",
        }
    }
}

/// `jpeg`, fitted to 640 and degraded.
pub fn degrade(jpeg: &[u8], how: Degradation) -> Result<Vec<u8>, InferenceError> {
    let (img, _) = ops::fit_within(&ops::decode_jpeg(jpeg)?, 640);
    let out = match how {
        Degradation::Blurred => imageops::blur(&img, 6.0),
        Degradation::Dark => {
            let mut d = img.clone();
            for p in d.pixels_mut() {
                p.0 = p.0.map(|c| c / 10);
            }
            d
        }
        Degradation::Tiny => {
            let w = 80u32;
            let h = (img.height() * w / img.width().max(1)).max(1);
            let small = imageops::resize(&img, w, h, imageops::FilterType::Triangle);
            let mut canvas = RgbImage::from_pixel(640, 480.max(h), Rgb([90, 90, 90]));
            imageops::overlay(&mut canvas, &small, 280, 200);
            canvas
        }
    };
    encode(&out, 90)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn homography_maps_the_corners() {
        let src = [(0.0, 0.0), (100.0, 0.0), (100.0, 50.0), (0.0, 50.0)];
        let dst = [(3.0, -2.0), (97.0, 1.0), (104.0, 49.0), (-1.0, 52.0)];
        let h = homography(&src, &dst).unwrap();
        for (s, d) in src.iter().zip(&dst) {
            let (x, y) = (s.0 as f64, s.1 as f64);
            let z = h[6] * x + h[7] * y + h[8];
            let (u, v) = (
                (h[0] * x + h[1] * y + h[2]) / z,
                (h[3] * x + h[4] * y + h[5]) / z,
            );
            assert!((u - d.0 as f64).abs() < 1e-6 && (v - d.1 as f64).abs() < 1e-6);
        }
    }

    #[test]
    fn a_held_up_photo_moves_and_a_replayed_one_does_not() {
        let img = RgbImage::from_fn(64, 48, |x, y| Rgb([(x * 4) as u8, (y * 5) as u8, 128]));
        let jpeg = encode(&img, 90).unwrap();
        let same = held_up_photo(&jpeg, 3, 0.0, 1).unwrap();
        assert!(same.iter().all(|f| f == &same[0]));
        let moved = held_up_photo(&jpeg, 3, 0.02, 1).unwrap();
        assert!(moved[0] != moved[1] && moved[1] != moved[2]);
        for f in &moved {
            assert_eq!(ops::decode_jpeg(f).unwrap().dimensions(), (64, 48));
        }
    }
}
