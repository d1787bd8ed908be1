//! Loading ONNX Runtime (`ort` with `load-dynamic`) and building sessions.
//!
//! The library comes from the PyPI wheel `onnxruntime==1.31.1` (or `onnxruntime-gpu`), which
//! `scripts/setup.sh` unpacks into `.cache/onnxruntime/`. It is found through `VIGIL_ORT_DYLIB`,
//! or else in the places listed by [`candidates`].

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

use super::InferenceError;

/// The file name of the ONNX Runtime library this build expects.
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// Where to look for ONNX Runtime when `VIGIL_ORT_DYLIB` is not set: the project's cache
/// (relative to the working directory and to the executable), and the container image's path.
pub fn candidates() -> Vec<PathBuf> {
    let mut out = vec![PathBuf::from(".cache/onnxruntime").join(ORT_LIBRARY)];
    if let Ok(exe) = std::env::current_exe() {
        // target/{debug,release}/<bin> and target/{debug,release}/deps/<test>
        for up in exe.ancestors().skip(1).take(4) {
            out.push(up.join(".cache/onnxruntime").join(ORT_LIBRARY));
        }
    }
    out.push(PathBuf::from("/opt/vigil/lib").join(ORT_LIBRARY));
    out
}

/// Find the library: `explicit` (from config or `VIGIL_ORT_DYLIB`), or the first candidate.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, InferenceError> {
    if let Some(p) = explicit {
        return if p.is_file() {
            Ok(p.to_owned())
        } else {
            Err(InferenceError::Runtime(format!(
                "VIGIL_ORT_DYLIB points at {}, which does not exist; run scripts/setup.sh or fix the path",
                p.display()
            )))
        };
    }
    candidates()
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            InferenceError::Runtime(format!(
                "ONNX Runtime ({ORT_LIBRARY}) not found; run scripts/setup.sh (it unpacks the \
             onnxruntime==1.31.1 wheel into .cache/onnxruntime/) or set VIGIL_ORT_DYLIB"
            ))
        })
}

static ENVIRONMENT: OnceLock<Result<Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loaded once from `path`.
pub fn environment(path: &Path) -> Result<&'static Environment, InferenceError> {
    ENVIRONMENT
        .get_or_init(|| {
            let builder =
                ort::init_from(path).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            builder
                .with_name("vigil")
                .build()
                .map_err(|e| format!("cannot start ONNX Runtime: {e}"))
        })
        .as_ref()
        .map_err(|e| InferenceError::Runtime(e.clone()))
}

pub use vigil_core::domain::Device;

/// Build a session for one model file with `intra_threads` threads.
pub fn session(
    env: &Environment,
    model: &Path,
    intra_threads: usize,
    device: Device,
) -> Result<Session, InferenceError> {
    session_with(env, model, intra_threads, device, &[])
}

/// [`session`], with the dimensions in `free` declared by name ([`super::graph::free_dims`]):
/// an error when the file does not have them. The edited graph is loaded from memory, so the
/// file must hold its weights itself (no external data beside it).
pub fn session_with(
    env: &Environment,
    model: &Path,
    intra_threads: usize,
    device: Device,
    free: &[super::graph::FreeDim],
) -> Result<Session, InferenceError> {
    let fail = |e: ort::Error| InferenceError::Model {
        model: model.display().to_string(),
        message: e.to_string(),
    };
    let fail_b = |e: ort::Error<ort::session::builder::SessionBuilder>| InferenceError::Model {
        model: model.display().to_string(),
        message: e.to_string(),
    };
    let mut builder = Session::builder(env)
        .map_err(fail)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(fail_b)?
        .with_intra_threads(intra_threads.max(1))
        .map_err(fail_b)?
        .with_inter_threads(1)
        .map_err(fail_b)?;
    if device == Device::Cuda {
        builder = with_cuda(builder, model)?;
    }
    // Weights that the file also lists as graph inputs are handed over as constants, so that
    // ONNX Runtime folds them (see `graph`); a file without any is loaded from its path, where
    // ONNX Runtime finds any external data beside it.
    let bytes = std::fs::read(model).map_err(|e| InferenceError::Model {
        model: model.display().to_string(),
        message: format!("cannot read: {e}"),
    })?;
    if !free.is_empty() {
        let (bytes, _) = super::graph::constant_initializers(&bytes);
        let edited =
            super::graph::free_dims(&bytes, free).ok_or_else(|| InferenceError::Model {
                model: model.display().to_string(),
                message: format!(
                    "the graph does not have the dimensions to free: {}",
                    free.iter()
                        .map(|d| format!("{}[{}]", d.value, d.index))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        return builder.commit_from_memory(&edited).map_err(fail);
    }
    match super::graph::constant_initializers(&bytes) {
        (edited, constants) if constants > 0 => {
            tracing::debug!(
                model = %model.display(),
                constants,
                "weights listed as graph inputs are loaded as constants"
            );
            builder.commit_from_memory(&edited).map_err(fail)
        }
        _ => builder.commit_from_file(model).map_err(fail),
    }
}

#[cfg(feature = "cuda")]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    model: &Path,
) -> Result<ort::session::builder::SessionBuilder, InferenceError> {
    use ort::ep::ExecutionProvider as _;
    if !ort::ep::CUDA::is_available().unwrap_or(false) {
        tracing::warn!(model = %model.display(), "CUDA is not usable here; running on CPU");
        return Ok(builder);
    }
    builder
        .with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])
        .or_else(|e| {
            tracing::warn!(model = %model.display(), error = %e, "CUDA failed to start; running on CPU");
            Ok(e.recover())
        })
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    builder: ort::session::builder::SessionBuilder,
    model: &Path,
) -> Result<ort::session::builder::SessionBuilder, InferenceError> {
    tracing::warn!(
        model = %model.display(),
        "device = cuda, but this build has no `cuda` feature; running on CPU"
    );
    Ok(builder)
}
