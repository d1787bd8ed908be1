//! `vigil eval`: the system's error rates on labelled real data, with their plots.

use std::path::{Path, PathBuf};

use super::{CliError, fail};
use crate::config::Config;

pub(super) fn eval(
    cfg: &Config,
    data: PathBuf,
    out: &Path,
    fps: f64,
    attack_frames: usize,
    footage: PathBuf,
    fetch_only: bool,
) -> Result<(), CliError> {
    if !(fps > 0.0 && fps <= 30.0) || attack_frames < 2 {
        return Err(fail(
            "--fps must be within 0..=30 and --attack-frames at least 2",
        ));
    }
    if fetch_only {
        crate::tools::eval::fetch(&data, fps).map_err(fail)?;
        println!("eval data ready in {}", data.display());
        return Ok(());
    }
    let opts = crate::tools::eval::EvalOptions {
        data,
        fps,
        attack_frames,
        footage: footage.is_dir().then_some(footage),
    };
    let report =
        crate::tools::eval::run(cfg, &opts, &mut |step| eprintln!("eval: {step}")).map_err(fail)?;
    std::fs::create_dir_all(out).map_err(fail)?;
    let path = out.join("eval.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report).map_err(fail)?).map_err(fail)?;
    print!("{}", crate::tools::eval::summary(&report));
    println!("full report: {}", path.display());
    match crate::tools::plots::write_all(&report, out) {
        Ok(files) => {
            for f in files {
                println!("plot: {}", f.display());
            }
        }
        // The figures above and the JSON stand without the pictures.
        Err(e) => eprintln!("vigil: plots not drawn: {e}"),
    }
    Ok(())
}
