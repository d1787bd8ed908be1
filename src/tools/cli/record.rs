//! `vigil record`, `vigil capture` and `vigil replay`: capture files, recorded live or
//! exported from the capture stream, described, and replayed through the live pipeline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Subcommand;

use super::{CliError, fail, print_report, since_ms};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum CaptureCmd {
    /// Counts, clients, duration, fps and frame sizes.
    Info { file: PathBuf },
}

/// `vigil capture`.
pub(super) fn capture(action: CaptureCmd) -> Result<(), CliError> {
    match action {
        CaptureCmd::Info { file } => {
            let capture = crate::tools::capture::Capture::read_file(&file).map_err(fail)?;
            print!("{}", capture.info().render());
            Ok(())
        }
    }
}

/// `vigil record --from-stream`: the last minutes of the capture stream into a capture file.
pub(super) async fn record_from_stream(
    cfg: &Config,
    out: &Path,
    since: Option<Duration>,
) -> Result<(), CliError> {
    let since_ms = since_ms(since);
    let capture = crate::tools::recorder::from_stream(cfg, since_ms)
        .await
        .map_err(fail)?;
    crate::tools::recorder::write_capture(&capture, out).map_err(fail)?;
    println!(
        "exported {} frames from the capture stream into {}",
        capture.records.len(),
        out.display()
    );
    Ok(())
}

pub(super) async fn record(
    cfg: &Config,
    out: &Path,
    results: bool,
    duration: Option<Duration>,
    frames: Option<u64>,
) -> Result<(), CliError> {
    let stop = crate::telemetry::shutdown_on_signals();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(Duration::from_millis(200));
    let opts = crate::tools::recorder::RecordOptions {
        results,
        duration,
        max_frames: frames,
    };
    let counts = crate::tools::recorder::record(cfg, out, &opts, stop, &mut |c| {
        bar.set_message(format!("{} frames, {} results", c.frames, c.results));
    })
    .await
    .map_err(fail)?;
    bar.finish_and_clear();
    println!(
        "recorded {} frames and {} results into {}",
        counts.frames,
        counts.results,
        out.display()
    );
    Ok(())
}

pub(super) async fn replay(
    cfg: &Config,
    capture: crate::tools::capture::Capture,
    opts: &crate::tools::replay::ReplayOptions,
    json: bool,
    out: Option<&Path>,
) -> Result<(), CliError> {
    if opts.compare && !capture.header.results {
        return Err(fail("--compare needs a capture recorded with --results"));
    }
    let bar = indicatif::ProgressBar::new(capture.frames().len() as u64);
    let report = crate::tools::replay::replay(cfg, &capture, opts, &mut |sent, answered| {
        bar.set_position(answered);
        bar.set_message(format!("{sent} sent"));
    })
    .await
    .map_err(fail)?;
    bar.finish_and_clear();
    if let Some(path) = out {
        let text = serde_json::to_string_pretty(&report).map_err(fail)?;
        std::fs::write(path, text).map_err(|e| fail(format!("{}: {e}", path.display())))?;
    }
    print_report(json, &report, report.render());
    if report.comparison.as_ref().is_some_and(|c| c.exceeded) {
        return Err(CliError {
            code: 3,
            message: "replay differs from the recording beyond the tolerance".into(),
        });
    }
    Ok(())
}
