//! Pixels and models: the only crate that depends on `image` and `ort`. It holds the model
//! stack behind the `identity` analyzer, its settings, ONNX Runtime loading, and the synthetic
//! frames used by demos, benchmarks and tests. `vigil` re-exports it as `vigil::inference`.

pub mod config;
pub mod graph;
pub mod identity;
pub mod imageops;
pub mod manifest;
pub mod models;
pub mod quality;
pub mod runtime;
pub mod synth;

use std::path::{Path, PathBuf};
use std::time::Instant;

use image::codecs::jpeg::JpegEncoder;
use image::{ImageBuffer, Rgb};
use ort::value::Tensor;

pub use identity::{BatchFrame, EnrollError, Enrollment, IdentityStack};
pub use runtime::Device;

#[derive(Debug, Clone, thiserror::Error)]
pub enum InferenceError {
    /// ONNX Runtime could not be found or started; the message names the fix.
    #[error("{0}")]
    Runtime(String),
    #[error("model {model}: {message}")]
    Model { model: String, message: String },
    #[error("cannot decode image: {0}")]
    BadImage(String),
}

/// Find `libonnxruntime` (see [`runtime::locate`]).
pub fn locate_runtime(explicit: Option<&Path>) -> Result<PathBuf, InferenceError> {
    runtime::locate(explicit)
}

/// A model's signature and the time of one run on zeros.
#[derive(Debug, Clone)]
pub struct ProbeReport {
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub run_ms: f64,
}

/// Load `model`, read its inputs and outputs, and run it once on zeros of `shape` (`-1`
/// dimensions become 480x640-ish sizes), given to every input (a model with several inputs,
/// such as the fused MiniFASNet, takes them all of one shape).
pub fn probe(
    lib: &Path,
    model: &Path,
    dtype: &str,
    shape: &[i64],
) -> Result<ProbeReport, InferenceError> {
    let env = runtime::environment(lib)?;
    let mut session = runtime::session(env, model, 1, Device::Cpu)?;
    let fail = |e: ort::Error| InferenceError::Model {
        model: model.display().to_string(),
        message: e.to_string(),
    };
    let describe = |o: &ort::value::Outlet| format!("{} {:?}", o.name(), o.dtype());
    let inputs: Vec<String> = session.inputs().iter().map(describe).collect();
    let outputs: Vec<String> = session.outputs().iter().map(describe).collect();
    let input_names: Vec<String> = session
        .inputs()
        .iter()
        .map(|o| o.name().to_owned())
        .collect();
    let dims: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(i, d)| {
            if *d > 0 {
                *d as usize
            } else if i == 1 {
                480
            } else {
                640
            }
        })
        .collect();
    let n: usize = dims.iter().product();
    let started = Instant::now();
    match dtype {
        "u8" => {
            let inputs = input_names
                .iter()
                .map(|name| {
                    Ok((
                        name.as_str(),
                        Tensor::from_array((dims.clone(), vec![0u8; n]))?,
                    ))
                })
                .collect::<Result<Vec<_>, ort::Error>>()
                .map_err(fail)?;
            session.run(inputs).map_err(fail)?;
        }
        _ => {
            let inputs = input_names
                .iter()
                .map(|name| {
                    Ok((
                        name.as_str(),
                        Tensor::from_array((dims.clone(), vec![0f32; n]))?,
                    ))
                })
                .collect::<Result<Vec<_>, ort::Error>>()
                .map_err(fail)?;
            session.run(inputs).map_err(fail)?;
        }
    }
    Ok(ProbeReport {
        inputs,
        outputs,
        run_ms: started.elapsed().as_secs_f64() * 1e3,
    })
}

/// A camera-sized frame from a photo: scaled to fit `max` x `max`, re-encoded as JPEG.
pub fn camera_frame(jpeg: &[u8], max: u32) -> Result<(Vec<u8>, u32, u32), InferenceError> {
    let img = imageops::decode_jpeg(jpeg)?;
    let (small, _) = imageops::fit_within(&img, max);
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 90)
        .encode_image(&small)
        .map_err(|e| InferenceError::BadImage(e.to_string()))?;
    Ok((out, small.width(), small.height()))
}

/// Encode a `width`x`height` JPEG of a smooth gradient with noise (so it compresses like a
/// camera frame), then pad it with COM segments to exactly `target_bytes` when that is larger.
pub fn synthetic_jpeg(width: u32, height: u32, seed: u64, target_bytes: usize) -> Vec<u8> {
    let mut state = seed | 1;
    let mut noise = move || {
        // xorshift64: deterministic, no allocation.
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state & 0x3f) as u8
    };
    let img = ImageBuffer::from_fn(width, height, |x, y| {
        let r = (x * 255 / width.max(1)) as u8;
        let g = (y * 255 / height.max(1)) as u8;
        let b = ((x + y) % 256) as u8;
        Rgb([
            r.saturating_add(noise()),
            g.saturating_add(noise()),
            b.saturating_add(noise()),
        ])
    });
    // Lower the quality until the frame fits the target, then pad it to the exact size.
    let mut out = Vec::new();
    for quality in [90, 75, 60, 45, 30, 15] {
        out.clear();
        JpegEncoder::new_with_quality(&mut out, quality)
            .encode_image(&img)
            .expect("encoding into memory cannot fail");
        if target_bytes == 0 || out.len() + 4 <= target_bytes {
            break;
        }
    }
    pad_jpeg(out, target_bytes)
}

/// Insert COM (comment) segments after SOI until the file is exactly `target` bytes long.
/// Decoders and the `frame-info` marker walk skip comments.
pub fn pad_jpeg(jpeg: Vec<u8>, target: usize) -> Vec<u8> {
    if jpeg.len() + 4 > target || !jpeg.starts_with(&[0xFF, 0xD8]) {
        return jpeg;
    }
    let mut missing = target - jpeg.len();
    let mut out = Vec::with_capacity(target);
    out.extend_from_slice(&jpeg[..2]);
    while missing > 0 {
        // A segment is 4 header bytes plus up to 65533 bytes of comment.
        let body = (missing - 4).min(65_533);
        let rest = missing - (4 + body);
        // Avoid leaving a remainder too small for another segment.
        let body = if rest > 0 && rest < 4 {
            body - (4 - rest)
        } else {
            body
        };
        out.extend_from_slice(&[0xFF, 0xFE]);
        out.extend_from_slice(&((body + 2) as u16).to_be_bytes());
        out.extend(std::iter::repeat_n(b' ', body));
        missing -= 4 + body;
    }
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_core::wire::jpeg::info as jpeg_info;

    #[test]
    fn synthetic_frames_are_real_jpegs_of_the_asked_size() {
        for target in [0usize, 20_000, 40_000, 150_000] {
            let jpeg = synthetic_jpeg(320, 240, 7, target);
            if target >= 40_000 {
                assert_eq!(jpeg.len(), target);
            }
            let info = jpeg_info(&jpeg).unwrap();
            assert_eq!((info.width, info.height, info.components), (320, 240, 3));
            image::load_from_memory(&jpeg).unwrap();
        }
    }
}
