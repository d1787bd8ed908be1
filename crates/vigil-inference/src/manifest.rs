//! The model manifest (`models/models.toml`): which file plays which role, where it comes
//! from, and how a file on disk is verified. Fetching lives with the tools
//! (`vigil models fetch`, in the `vigil` crate's tools).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate as inference;

/// The manifest this build ships with.
pub const MANIFEST: &str = include_str!("../../../models/models.toml");

/// The roles without which the `identity` analyzer cannot run.
pub const REQUIRED_ROLES: [&str; 4] = [
    "face_detection",
    "face_recognition",
    "liveness",
    "phone_detection",
];

/// The optional presentation-attack model: a score (`LivenessScore::pad`), never a verdict.
pub const PAD_ROLE: &str = "pad";

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
    /// `true` (default): the worker refuses to start without the file, and `vigil models
    /// fetch` fails when no source gives it. `false`: the worker starts without it (and says
    /// so in its log), and the fetch reports it as unavailable.
    #[serde(default = "yes")]
    pub required: bool,
}

fn yes() -> bool {
    true
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
    Pypi {
        pypi: String,
        path: String,
    },
    Npm {
        npm: String,
        path: String,
    },
    Convert {
        convert: String,
    },
    /// A file committed in this repository (its licence allowing it), by its path from the
    /// repository's root: the repository is its own source.
    Repo {
        repo: String,
    },
    Url {
        url: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    pub npm: String,
    pub path: String,
    /// Pinned tool chains, each for the Python versions it installs on; the first whose
    /// versions include an available Python's is used.
    pub toolchain: Vec<Toolchain>,
}

/// One pinned set of conversion tools and the command that runs them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Toolchain {
    /// The Python versions (`"3.12"`) these pins install on.
    pub pythons: Vec<String>,
    /// What `pip install` gets, every package pinned.
    pub packages: Vec<String>,
    /// The arguments to that Python; `{input}` and `{output}` are replaced.
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
        for (name, recipe) in &m.recipe {
            if recipe.toolchain.is_empty() {
                errors.push(format!("recipe `{name}` has no toolchain"));
            }
            for t in &recipe.toolchain {
                if t.pythons.is_empty() || t.packages.iter().any(|p| !p.contains("==")) {
                    errors.push(format!(
                        "recipe `{name}`: every toolchain names its Pythons and pins every package"
                    ));
                }
            }
        }
        for role in REQUIRED_ROLES {
            if !m.models.iter().any(|x| x.role == role && x.required) {
                errors.push(format!("no required model has role `{role}`"));
            }
        }
        if errors.is_empty() {
            Ok(m)
        } else {
            Err(ModelsError::Manifest(errors.join("; ")))
        }
    }

    /// The model of one of the [`REQUIRED_ROLES`].
    pub fn by_role(&self, role: &str) -> &ModelEntry {
        self.find_role(role)
            .expect("validated manifest has every required role")
    }

    /// The model of `role`, if the manifest has one (for optional roles such as `pad`).
    pub fn find_role(&self, role: &str) -> Option<&ModelEntry> {
        self.models.iter().find(|m| m.role == role)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Thresholds;

    #[test]
    fn manifest_is_valid_and_matches_the_default_thresholds() {
        let m = Manifest::embedded().unwrap();
        assert_eq!(m.models.len(), 5);
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
        // The PAD model is committed (its licence allows it), and optional.
        let pad = m.find_role(PAD_ROLE).expect("the manifest has a pad model");
        assert!(!pad.required);
        assert!(REQUIRED_ROLES.iter().all(|r| m.by_role(r).required));
        match &pad.sources[0] {
            Source::Repo { repo } => {
                // The repository's root, two folders above this crate.
                let path = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../..")
                    .join(repo);
                assert_eq!(
                    sha256_file(&path).unwrap(),
                    pad.sha256,
                    "{}",
                    path.display()
                );
            }
            other => panic!("the pad model should be committed, not {other:?}"),
        }
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
