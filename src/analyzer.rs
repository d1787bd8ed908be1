//! What a worker runs on each frame. [`Analyzer`] is the seam; `frame-info` is the
//! transport-level analyzer (JPEG markers only, no pixel decoding) used by benchmarks.

use std::time::Duration;

use crate::config::Config;
use crate::inference::{BatchFrame, IdentityStack, InferenceError};
use crate::wire::Analysis;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnalyzeError {
    /// The bytes are not a JPEG this analyzer can read: a permanent failure of the input.
    #[error("bad jpeg: {0}")]
    BadJpeg(String),
    /// The analyzer itself failed (for example a model run): the frame may succeed elsewhere.
    #[error("analyzer failed: {0}")]
    Internal(String),
}

/// A frame as an analyzer sees it.
pub struct FrameInput<'a> {
    pub client_id: &'a str,
    pub jpeg: &'a [u8],
    /// The client's enrolled reference embedding, when it has one.
    pub reference: Option<&'a [f32]>,
    /// Whether the phone detector must run ([`crate::cadence`]).
    pub phone_check: bool,
    /// The face track the frame may carry its identity over to ([`crate::wire::Frame::track`]),
    /// checked valid.
    pub track: Option<&'a crate::wire::Track>,
}

/// An analysis with the seconds each stage (model) took.
pub struct Analyzed {
    pub analysis: Analysis,
    pub stages: Vec<(&'static str, f64)>,
}

impl From<Analysis> for Analyzed {
    fn from(analysis: Analysis) -> Self {
        Self {
            analysis,
            stages: Vec::new(),
        }
    }
}

/// Turns a frame into an [`Analysis`]. Implementations are shared across threads.
pub trait Analyzer: Send + Sync + 'static {
    /// The name reported in results and accepted by `VIGIL_ANALYZER`.
    fn name(&self) -> &'static str;

    /// Analyse one frame. May block; the worker calls it off the async runtime when
    /// [`Analyzer::is_blocking`] says so.
    fn analyze(&self, frame: &FrameInput<'_>) -> Result<Analyzed, AnalyzeError>;

    /// Analyse several frames at once, one result per frame in their order. By default each
    /// alone; the model stack runs its batchable models once on them all.
    fn analyze_batch(&self, frames: &[FrameInput<'_>]) -> Vec<Result<Analyzed, AnalyzeError>> {
        frames.iter().map(|f| self.analyze(f)).collect()
    }

    /// True when `analyze` does real CPU work (decode, models) and must leave the runtime.
    fn is_blocking(&self) -> bool {
        true
    }

    /// The model stack that can enrol clients, when this analyzer has one; a worker without
    /// one does not take enrolment requests.
    fn enroller(&self) -> Option<&IdentityStack> {
        None
    }
}

/// Build the analyzer a config names. The `identity` analyzer loads its models here, one set of
/// sessions per analysis thread.
pub(crate) fn from_config(cfg: &Config) -> Result<Box<dyn Analyzer>, AnalyzeError> {
    match cfg.worker.analyzer.as_str() {
        "frame-info" => Ok(Box::new(FrameInfo)),
        "delay" => Ok(Box::new(Delay {
            service_time: Duration::from_millis(cfg.worker.delay_ms),
        })),
        "identity" => {
            let sets = cfg.worker.effective_analysis_threads();
            let stack =
                IdentityStack::load_with(&cfg.inference, sets, cfg.worker.effective_batch_max())
                    .map_err(|e| AnalyzeError::Internal(e.to_string()))?;
            Ok(Box::new(Identity { stack }))
        }
        other => Err(AnalyzeError::Internal(format!(
            "unknown analyzer `{other}`"
        ))),
    }
}

/// The model stack: face detection, recognition against the reference, liveness, phones.
pub(crate) struct Identity {
    pub stack: IdentityStack,
}

impl Analyzer for Identity {
    fn name(&self) -> &'static str {
        "identity"
    }

    fn enroller(&self) -> Option<&IdentityStack> {
        Some(&self.stack)
    }

    fn analyze(&self, frame: &FrameInput<'_>) -> Result<Analyzed, AnalyzeError> {
        self.analyze_batch(std::slice::from_ref(frame))
            .pop()
            .expect("one result per frame")
    }

    fn analyze_batch(&self, frames: &[FrameInput<'_>]) -> Vec<Result<Analyzed, AnalyzeError>> {
        let batch: Vec<BatchFrame<'_>> = frames
            .iter()
            .map(|f| BatchFrame {
                jpeg: f.jpeg,
                reference: f.reference,
                phone_check: f.phone_check,
                track: f.track,
            })
            .collect();
        self.stack
            .analyze_batch(&batch)
            .into_iter()
            .map(|r| match r {
                Ok((analysis, stages)) => Ok(Analyzed {
                    analysis: Analysis::Identity(analysis),
                    stages,
                }),
                Err(InferenceError::BadImage(e)) => Err(AnalyzeError::BadJpeg(e)),
                Err(e) => Err(AnalyzeError::Internal(e.to_string())),
            })
            .collect()
    }
}

/// A benchmarking tool, not a default: `frame-info` plus a fixed service time per frame, spent
/// on an analysis thread as a model would. It makes worker capacity predictable
/// (`analysis_threads / service_time` frames per second per worker), so scaling by replica count
/// can be measured on a small machine.
pub(crate) struct Delay {
    pub service_time: Duration,
}

impl Analyzer for Delay {
    fn name(&self) -> &'static str {
        "delay"
    }

    fn analyze(&self, frame: &FrameInput<'_>) -> Result<Analyzed, AnalyzeError> {
        std::thread::sleep(self.service_time);
        FrameInfo.analyze(frame)
    }
}

/// Reads width, height and component count from the JPEG's start-of-frame marker.
pub(crate) struct FrameInfo;

impl Analyzer for FrameInfo {
    fn name(&self) -> &'static str {
        "frame-info"
    }

    fn analyze(&self, frame: &FrameInput<'_>) -> Result<Analyzed, AnalyzeError> {
        let info = jpeg_info(frame.jpeg)?;
        Ok(Analysis::FrameInfo {
            width: info.width,
            height: info.height,
            components: info.components,
        }
        .into())
    }

    fn is_blocking(&self) -> bool {
        // A marker walk over a few segments: microseconds, fine on the runtime.
        false
    }
}

pub(crate) use crate::wire::jpeg::JpegInfo;

/// [`crate::wire::jpeg::info`], as an analysis error.
pub(crate) fn jpeg_info(data: &[u8]) -> Result<JpegInfo, AnalyzeError> {
    crate::wire::jpeg::info(data).map_err(|e| AnalyzeError::BadJpeg(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SOI, an APP0 segment, SOF0 for 640x480x3, then EOI.
    fn minimal() -> Vec<u8> {
        let mut v = vec![0xFF, 0xD8];
        v.extend([0xFF, 0xE0, 0x00, 0x04, 0xAA, 0xBB]);
        v.extend([0xFF, 0xFF]); // fill byte
        v.extend([
            0xC0, 0x00, 0x11, 0x08, 0x01, 0xE0, 0x02, 0x80, 0x03, 1, 0x22, 0, 2, 0x11, 1, 3, 0x11,
            1,
        ]);
        v.extend([0xFF, 0xD9]);
        v
    }

    #[test]
    fn reads_dimensions() {
        let info = jpeg_info(&minimal()).unwrap();
        assert_eq!(
            (info.width, info.height, info.components, info.precision),
            (640, 480, 3, 8)
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(jpeg_info(b"GIF89a").is_err());
        assert!(jpeg_info(&[0xFF, 0xD8]).is_err());
        assert!(jpeg_info(&[0xFF, 0xD8, 0xFF, 0xDA, 0, 2]).is_err());
        let full = minimal();
        for cut in 0..full.len() - 2 {
            assert!(jpeg_info(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    proptest::proptest! {
        #[test]
        fn never_panics(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut data = vec![0xFF, 0xD8];
            data.extend(tail);
            let _ = jpeg_info(&data);
        }
    }
}
