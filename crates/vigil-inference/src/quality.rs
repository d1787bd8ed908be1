//! The quality gate: is a face good enough to be judged at all? A face that is too small,
//! blurred, badly lit or turned away gives unreliable identity and liveness scores, so its
//! frame is answered `low_quality` (with the reason) instead of being judged.

use image::RgbImage;

use super::imageops::{self, Similarity};
use super::models::Face;
use crate::config::Thresholds;
use vigil_core::wire::FaceQuality;

/// The part of the 112x112 aligned face that is face (not background) in every pose the
/// gate lets through: from the brows to below the mouth.
const REGION_X: (usize, usize) = (24, 88);
const REGION_Y: (usize, usize) = (36, 100);

/// Measure `face`, given its aligned 112x112 crop and the alignment `m` that made it.
pub fn measure(aligned: &RgbImage, face: &Face, m: &Similarity) -> FaceQuality {
    let grey = imageops::luma(aligned);
    let (brightness, sharpness) =
        imageops::mean_and_laplacian_variance(&grey, aligned.width() as usize, REGION_X, REGION_Y);
    let l = face.landmarks.map(|p| m.apply(p));
    let eyes = ((l[0].0 + l[1].0) / 2.0, (l[0].1 + l[1].1) / 2.0);
    let mouth_y = (l[3].1 + l[4].1) / 2.0;
    let eye_distance = ((l[1].0 - l[0].0).powi(2) + (l[1].1 - l[0].1).powi(2))
        .sqrt()
        .max(1.0);
    let yaw = (l[2].0 - eyes.0) / eye_distance;
    let pitch = (l[2].1 - eyes.1) / (mouth_y - eyes.1).abs().max(1.0);
    FaceQuality {
        face_px: face.w.min(face.h),
        sharpness,
        brightness,
        yaw,
        pitch,
        failed: None,
    }
}

/// The first measure outside its limits, if any.
pub fn failure(q: &FaceQuality, t: &Thresholds) -> Option<&'static str> {
    if q.face_px < t.face_min_px {
        Some("too_small")
    } else if q.brightness < t.brightness_min {
        Some("too_dark")
    } else if q.brightness > t.brightness_max {
        Some("too_bright")
    } else if q.yaw.abs() > t.yaw_max || q.pitch < t.pitch_min || q.pitch > t.pitch_max {
        Some("turned")
    } else if q.sharpness < t.sharpness_min {
        Some("blurred")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quality(face_px: f32, sharpness: f32, brightness: f32, yaw: f32) -> FaceQuality {
        FaceQuality {
            face_px,
            sharpness,
            brightness,
            yaw,
            pitch: 0.5,
            failed: None,
        }
    }

    #[test]
    fn each_limit_fails_with_its_own_reason() {
        let t = Thresholds::default();
        assert_eq!(failure(&quality(200.0, 500.0, 120.0, 0.0), &t), None);
        assert_eq!(
            failure(&quality(10.0, 500.0, 120.0, 0.0), &t),
            Some("too_small")
        );
        assert_eq!(
            failure(&quality(200.0, 500.0, 5.0, 0.0), &t),
            Some("too_dark")
        );
        assert_eq!(
            failure(&quality(200.0, 500.0, 250.0, 0.0), &t),
            Some("too_bright")
        );
        assert_eq!(
            failure(&quality(200.0, 500.0, 120.0, 0.9), &t),
            Some("turned")
        );
        assert_eq!(
            failure(&quality(200.0, 0.5, 120.0, 0.0), &t),
            Some("blurred")
        );
    }

    #[test]
    fn a_frontal_face_on_the_template_is_level() {
        // Landmarks exactly on the template: no turn either way.
        let lm = [
            (38.2946, 51.6963),
            (73.5318, 51.5014),
            (56.0252, 71.7366),
            (41.5493, 92.3655),
            (70.7299, 92.2041),
        ];
        let face = Face {
            x: 20.0,
            y: 20.0,
            w: 72.0,
            h: 90.0,
            score: 0.9,
            landmarks: lm,
        };
        let id = Similarity {
            a: 1.0,
            b: 0.0,
            tx: 0.0,
            ty: 0.0,
        };
        let img = RgbImage::from_pixel(112, 112, image::Rgb([100, 100, 100]));
        let q = measure(&img, &face, &id);
        assert!(q.yaw.abs() < 0.01, "{q:?}");
        assert!((q.pitch - 0.494).abs() < 0.01, "{q:?}");
        assert!(
            (q.brightness - 100.0).abs() < 0.5 && q.sharpness < 1e-3,
            "{q:?}"
        );
    }
}
