//! `vigil stream`: one client streaming JPEG files to an edge, printing every reply, and
//! answering liveness challenges from real footage when asked.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{CliError, fail, load_images};
use crate::config::Config;
use crate::edge::client::{Connection, Incoming};
use crate::wire::client::{Encoding, ServerMsg};

#[derive(Debug, clap::Args)]
pub struct StreamArgs {
    /// Edge URL, e.g. ws://127.0.0.1:8080/v1/stream
    #[arg(long)]
    pub url: String,
    #[arg(long)]
    pub client_id: String,
    #[arg(long)]
    pub token: String,
    /// A folder of .jpg files (sent in name order) or a file; repeat to send several, in
    /// order. The list is repeated until `--frames` have been sent.
    #[arg(long, required = true)]
    pub images: Vec<PathBuf>,
    /// Frames per second.
    #[arg(long, default_value_t = 5.0)]
    pub fps: f64,
    /// Frames to send in total.
    #[arg(long, default_value_t = 20)]
    pub frames: u64,
    /// Speak MessagePack instead of JSON.
    #[arg(long)]
    pub msgpack: bool,
    /// Answer liveness challenges with frames from this folder (real footage of the enrolled
    /// person, in filmed order), picked by the model stack's own pose against --reference.
    #[arg(long, requires = "reference")]
    pub answer_from: Option<PathBuf>,
    /// The enrolled person's reference photo, for --answer-from.
    #[arg(long)]
    pub reference: Option<PathBuf>,
}

pub(super) async fn stream(cfg: &Config, args: StreamArgs) -> Result<(), CliError> {
    let mut images = Vec::new();
    for path in &args.images {
        images.extend(load_images(path)?);
    }
    let answers = match (&args.answer_from, &args.reference) {
        (Some(dir), Some(reference)) => {
            let stack = crate::inference::IdentityStack::load(&cfg.inference, 1).map_err(fail)?;
            let jpeg = std::fs::read(reference)
                .map_err(|e| fail(format!("{}: {e}", reference.display())))?;
            let reference = stack
                .enroll(&jpeg)
                .map_err(|e| fail(format!("reference: {e}")))?;
            let frames: Vec<Vec<u8>> = load_images(dir)?.into_iter().map(|(_, b)| b).collect();
            let answers =
                crate::tools::answers::Answers::pick(&stack, &reference, &frames, &cfg.challenge)
                    .map_err(fail)?;
            let kinds: Vec<&str> = answers.kinds().iter().map(|k| k.as_str()).collect();
            println!(
                "answers challenges from {}: {} facing frames, turns: [{}]",
                dir.display(),
                answers.facing.len(),
                kinds.join(", ")
            );
            Some(answers)
        }
        _ => None,
    };
    // The receiver hands the sender the frames that answer a challenge (named by the step they
    // answer); they go first.
    let (answer_tx, mut answer_rx) = tokio::sync::mpsc::channel::<(String, Vec<u8>)>(256);
    let encoding = if args.msgpack {
        Encoding::MsgPack
    } else {
        Encoding::Json
    };
    let (conn, welcome) = Connection::connect(&args.url, &args.client_id, &args.token, encoding)
        .await
        .map_err(fail)?;
    if let ServerMsg::Welcome {
        session_id,
        max_fps,
        max_frame_bytes,
        ..
    } = &welcome
    {
        println!(
            "connected: session {session_id}, max {max_fps} fps, max {max_frame_bytes} bytes/frame"
        );
    }
    let (mut tx, mut rx) = conn.split();
    let period = Duration::from_secs_f64(1.0 / args.fps.max(0.01));
    let total = args.frames;
    // What was sent under each seq, for the printout (answers take regular frames' places).
    let names = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<
        u64,
        String,
    >::new()));
    let sent_names = names.clone();
    let sender = tokio::spawn(async move {
        let mut next = Instant::now();
        let mut regular = 0usize;
        for seq in 1..=total {
            let (name, jpeg) = match answer_rx.try_recv() {
                Ok(answer) => answer,
                Err(_) => {
                    regular += 1;
                    images[(regular - 1) % images.len()].clone()
                }
            };
            sent_names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(seq, name);
            if tx
                .send_frame(seq, crate::wire::now_ms(), &jpeg)
                .await
                .is_err()
            {
                break;
            }
            next += period;
            tokio::time::sleep_until(next.into()).await;
        }
        tx
    });
    let mut answered = 0;
    while answered < total {
        let incoming = tokio::time::timeout(Duration::from_secs(15), rx.recv()).await;
        let msg = match incoming {
            Err(_) => return Err(fail("no reply from the edge for 15 s")),
            Ok(None) => return Err(fail("the edge closed the connection")),
            Ok(Some(Err(e))) => return Err(fail(e)),
            Ok(Some(Ok(Incoming::Closed { code, reason }))) => {
                return Err(fail(format!("closed by the edge: {code} {reason}")));
            }
            Ok(Some(Ok(Incoming::Msg(m)))) => m,
        };
        let name = |seq: u64| {
            names
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&seq)
                .unwrap_or_default()
        };
        match msg {
            ServerMsg::Result {
                seq,
                latency_ms,
                analyzer,
                analysis,
                ..
            } => {
                answered += 1;
                println!(
                    "seq {seq:>4} {:<24} {latency_ms:>7.1} ms  {}",
                    name(seq),
                    describe_analysis(&analyzer, &analysis)
                );
            }
            ServerMsg::Dropped {
                seq,
                reason,
                detail,
            } => {
                answered += 1;
                println!(
                    "seq {seq:>4} {:<28} dropped {} {detail}",
                    name(seq),
                    reason.as_str()
                );
            }
            ServerMsg::Action {
                action,
                reason,
                action_id,
                ..
            } => println!(
                ">>> ACTION {} (reason: {reason}) action_id={action_id}",
                action.as_str()
            ),
            ServerMsg::Challenge {
                steps,
                deadline_ms,
                reason,
                ..
            } => {
                let kinds: Vec<&str> = steps.iter().map(|s| s.kind.as_str()).collect();
                println!(
                    ">>> CHALLENGE ({reason}): {} within {:.0} s",
                    kinds.join(", then "),
                    deadline_ms as f64 / 1e3
                );
                match &answers {
                    Some(a) => {
                        for step in &steps {
                            match a.step(step.kind) {
                                Some(frames) => {
                                    println!(
                                        "    answering {} with {} real frames",
                                        step.kind.as_str(),
                                        frames.len()
                                    );
                                    let label = format!("(answer: {})", step.kind.as_str());
                                    for f in frames {
                                        let _ = answer_tx.try_send((label.clone(), f));
                                    }
                                }
                                None => println!(
                                    "    the footage shows no {}: not answered",
                                    step.kind.as_str()
                                ),
                            }
                        }
                    }
                    None => println!("    (not answered: no --answer-from)"),
                }
            }
            ServerMsg::ChallengeProgress { done, .. } => {
                println!(">>> CHALLENGE step {done} done")
            }
            ServerMsg::ChallengeResult { passed, reason, .. } => println!(
                ">>> CHALLENGE {} ({reason})",
                if passed { "PASSED" } else { "FAILED" }
            ),
            other => println!("{}", serde_json::to_string(&other).unwrap_or_default()),
        }
    }
    // An action decided on the last frame follows its result: read what is still coming.
    while let Ok(Some(Ok(Incoming::Msg(ServerMsg::Action {
        action,
        reason,
        action_id,
        ..
    })))) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
    {
        println!(
            ">>> ACTION {} (reason: {reason}) action_id={action_id}",
            action.as_str()
        );
    }
    if let Ok(tx) = sender.await {
        tx.close().await;
    }
    Ok(())
}

/// One line for a result: the verdict and its scores, or the analyzer's facts.
fn describe_analysis(analyzer: &str, analysis: &crate::wire::Analysis) -> String {
    use crate::wire::Analysis;
    match analysis {
        Analysis::Identity(a) => {
            let mut parts = vec![
                format!("{:<15}", a.verdict.as_str()),
                format!("faces={}", a.faces.len()),
            ];
            if let Some(i) = &a.identity {
                parts.push(format!("similarity={:.2}", i.similarity));
            }
            if let Some(q) = &a.quality {
                parts.push(format!("yaw={:+.2}", q.yaw));
            }
            if let Some(l) = &a.liveness {
                parts.push(format!("p_live={:.2}", l.p_live));
            }
            if let Some(p) = &a.phone {
                parts.push(format!("phone={:.2}", p.score));
            }
            parts.join(" ")
        }
        other => format!(
            "{analyzer}: {}",
            serde_json::to_string(other).unwrap_or_default()
        ),
    }
}
