//! `vigil loadgen` and `vigil soak`: simulated clients streaming frames, with latency reports.

use std::path::PathBuf;
use std::time::Duration;

use super::{CliError, fail, load_images, parse_age, print_report};
use crate::config::Config;
use crate::directory::ClientRecord;
use crate::wire::client::Encoding;

#[derive(Debug, clap::Args)]
pub struct LoadgenArgs {
    #[arg(long)]
    pub url: String,
    #[arg(long, default_value_t = 10)]
    pub clients: usize,
    #[arg(long, default_value_t = 5.0)]
    pub fps: f64,
    #[arg(long, default_value = "30s", value_parser = parse_age)]
    pub duration: Duration,
    /// A folder of JPEG files to send.
    #[arg(long, conflicts_with = "capture")]
    pub images: Option<PathBuf>,
    /// A capture file whose frames to send.
    #[arg(long)]
    pub capture: Option<PathBuf>,
    #[arg(long, default_value = "loadgen-")]
    pub client_prefix: String,
    #[arg(long, default_value = "loadgen-token-000")]
    pub token: String,
    /// First add the clients to the directory at VIGIL_CLIENTS_DIR.
    #[arg(long)]
    pub create_clients: bool,
    #[arg(long)]
    pub json: bool,
}

pub(super) async fn loadgen(cfg: &Config, args: LoadgenArgs) -> Result<(), CliError> {
    let frames = load_frames(cfg, &args)?;
    let json = args.json;
    let opts = crate::tools::loadgen::LoadOptions {
        url: args.url,
        clients: args.clients,
        fps: args.fps,
        duration: args.duration,
        client_prefix: args.client_prefix,
        token: args.token,
        frames,
        encoding: Encoding::MsgPack,
    };
    let report = crate::tools::loadgen::run(opts, move |sent, results| {
        if !json {
            eprintln!("  sent {sent:>7}  results {results:>7}");
        }
    })
    .await;
    print_report(json, &report, report.render());
    Ok(())
}

pub(super) async fn soak(
    cfg: &Config,
    mut args: LoadgenArgs,
    window: Duration,
    pids: &[u32],
) -> Result<(), CliError> {
    let total = args.duration;
    let frames = load_frames(cfg, &args)?;
    args.create_clients = false;
    let windows = (total.as_secs_f64() / window.as_secs_f64()).ceil().max(1.0) as usize;
    println!(
        "soak: {} clients x {} fps, {} windows of {:?}",
        args.clients, args.fps, windows, window
    );
    println!(
        "| window | sent | results | dropped | errors | p50 ms | p90 ms | p99 ms | max ms | RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|"
    );
    let (mut errors, mut worst_p99) = (0, 0f64);
    for w in 1..=windows {
        let opts = crate::tools::loadgen::LoadOptions {
            url: args.url.clone(),
            clients: args.clients,
            fps: args.fps,
            duration: window,
            client_prefix: args.client_prefix.clone(),
            token: args.token.clone(),
            frames: frames.clone(),
            encoding: Encoding::MsgPack,
        };
        let r = crate::tools::loadgen::run(opts, |_, _| {}).await;
        let rss: Vec<String> = pids
            .iter()
            .map(|p| {
                crate::tools::attack::rss_mib(*p).map_or("-".into(), |m| format!("{p}:{m:.1}"))
            })
            .collect();
        println!(
            "| {w} | {} | {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r.frames_sent,
            r.results,
            r.dropped,
            r.errors,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms,
            rss.join(" ")
        );
        errors += r.errors;
        worst_p99 = worst_p99.max(r.p99_ms);
    }
    println!("soak done: {errors} errors, worst window p99 {worst_p99:.1} ms");
    if errors > 0 {
        return Err(CliError {
            code: 3,
            message: format!("{errors} errors during the soak"),
        });
    }
    Ok(())
}

/// The frames a load run sends: a folder of images, a capture, or a synthetic frame; creates
/// the clients first when asked.
fn load_frames(cfg: &Config, args: &LoadgenArgs) -> Result<Vec<Vec<u8>>, CliError> {
    let frames: Vec<Vec<u8>> = match (&args.images, &args.capture) {
        (Some(dir), _) => load_images(dir)?.into_iter().map(|(_, b)| b).collect(),
        (None, Some(file)) => crate::tools::capture::Capture::read_file(file)
            .map_err(fail)?
            .frames()
            .into_iter()
            .filter_map(|(_, e)| match e.payload {
                crate::wire::Payload::Frame(f) => Some(f.jpeg.to_vec()),
                _ => None,
            })
            .collect(),
        (None, None) => vec![crate::inference::synthetic_jpeg(640, 480, 1, 40_000)],
    };
    if frames.is_empty() {
        return Err(fail("no frames to send"));
    }
    if args.create_clients {
        let ids: Vec<String> = (0..args.clients)
            .map(|i| format!("{}{i}", args.client_prefix))
            .collect();
        add_clients(cfg, &ids, &args.token)?;
    }
    Ok(frames)
}

/// Add clients sharing one token, hashing on every core (argon2 is deliberately slow).
pub(super) fn add_clients(cfg: &Config, ids: &[String], token: &str) -> Result<(), CliError> {
    let store = cfg.open_directory().map_err(fail)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = ids.len().div_ceil(cores).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = ids
            .chunks(chunk)
            .map(|part| {
                let store = &store;
                scope.spawn(move || -> Result<(), CliError> {
                    for id in part {
                        let record = ClientRecord::new(id, id, token).map_err(fail)?;
                        store.put(&record).map_err(fail)?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| fail("a client-adding thread panicked"))?
        })
    })
}
