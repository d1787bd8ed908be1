//! The capture file: recorded frame (and result) events, for replay and regression checks.
//!
//! Layout: the magic `VIGILCAP`, a `u32` big-endian length and a MessagePack [`CaptureHeader`],
//! then records, each a `u32` big-endian length and a MessagePack [`CaptureRecord`] holding its
//! arrival time and the event exactly as it crossed the broker. Every record is written whole
//! and flushed, so a recording stopped at any point reads back; a torn last record (a crash
//! mid-write) is reported and skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::wire::{Envelope, Payload};

pub const MAGIC: &[u8; 8] = b"VIGILCAP";
pub const FORMAT_VERSION: u16 = 1;
/// A record larger than this is corrupt, not a frame.
const MAX_RECORD: u32 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("not a capture file (bad magic)")]
    BadMagic,
    #[error("capture format version {0} is newer than this build reads ({FORMAT_VERSION})")]
    Version(u16),
    #[error("corrupt capture: {0}")]
    Corrupt(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureHeader {
    pub format_version: u16,
    pub namespace: String,
    pub started_at_ms: u64,
    pub tool_version: String,
    /// Whether results were recorded too.
    pub results: bool,
    /// `live` or `stream`.
    pub source: String,
}

/// What a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordKind {
    Frame,
    Result,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureRecord {
    pub arrived_at_ms: u64,
    pub kind: RecordKind,
    /// The event as it crossed the broker (an encoded [`Envelope`]).
    #[serde(with = "serde_bytes")]
    pub event: Vec<u8>,
}

impl CaptureRecord {
    pub fn envelope(&self) -> Option<Envelope> {
        Envelope::decode(&self.event).ok()
    }
}

/// Writes a capture, flushing each record.
pub struct CaptureWriter<W: Write> {
    out: BufWriter<W>,
    pub records: u64,
}

impl<W: Write> CaptureWriter<W> {
    pub fn new(inner: W, header: &CaptureHeader) -> Result<Self, CaptureError> {
        let mut out = BufWriter::new(inner);
        out.write_all(MAGIC)?;
        write_block(
            &mut out,
            &rmp_serde::to_vec_named(header).expect("header encodes"),
        )?;
        out.flush()?;
        Ok(Self { out, records: 0 })
    }

    pub fn write(&mut self, record: &CaptureRecord) -> Result<(), CaptureError> {
        write_block(
            &mut self.out,
            &rmp_serde::to_vec_named(record).expect("record encodes"),
        )?;
        self.out.flush()?;
        self.records += 1;
        Ok(())
    }

    pub fn finish(mut self) -> Result<W, CaptureError> {
        self.out.flush()?;
        self.out
            .into_inner()
            .map_err(|e| CaptureError::Io(e.into_error()))
    }
}

fn write_block(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    out.write_all(&(bytes.len() as u32).to_be_bytes())?;
    out.write_all(bytes)
}

/// A capture read back.
#[derive(Debug, Clone)]
pub struct Capture {
    pub header: CaptureHeader,
    pub records: Vec<CaptureRecord>,
    /// True when the last record was cut short (the recorder died mid-write).
    pub truncated: bool,
}

impl Capture {
    pub fn read_file(path: &Path) -> Result<Self, CaptureError> {
        Self::read(BufReader::new(std::fs::File::open(path)?))
    }

    pub fn read(mut input: impl Read) -> Result<Self, CaptureError> {
        let mut magic = [0u8; 8];
        input
            .read_exact(&mut magic)
            .map_err(|_| CaptureError::BadMagic)?;
        if &magic != MAGIC {
            return Err(CaptureError::BadMagic);
        }
        let header_bytes =
            read_block(&mut input)?.ok_or_else(|| CaptureError::Corrupt("no header".into()))?;
        let header: CaptureHeader = rmp_serde::from_slice(&header_bytes)
            .map_err(|e| CaptureError::Corrupt(format!("header: {e}")))?;
        if header.format_version > FORMAT_VERSION {
            return Err(CaptureError::Version(header.format_version));
        }
        let mut records = Vec::new();
        let mut truncated = false;
        loop {
            match read_block(&mut input) {
                Ok(Some(bytes)) => match rmp_serde::from_slice(&bytes) {
                    Ok(r) => records.push(r),
                    Err(e) => {
                        return Err(CaptureError::Corrupt(format!(
                            "record {}: {e}",
                            records.len() + 1
                        )));
                    }
                },
                Ok(None) => break,
                Err(CaptureError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    truncated = true;
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Self {
            header,
            records,
            truncated,
        })
    }

    /// Frame events in arrival order, with their arrival times.
    pub fn frames(&self) -> Vec<(u64, Envelope)> {
        self.of_kind(RecordKind::Frame)
    }

    /// Recorded results (and drops), in arrival order.
    pub fn results(&self) -> Vec<(u64, Envelope)> {
        self.of_kind(RecordKind::Result)
    }

    fn of_kind(&self, kind: RecordKind) -> Vec<(u64, Envelope)> {
        self.records
            .iter()
            .filter(|r| r.kind == kind)
            .filter_map(|r| r.envelope().map(|e| (r.arrived_at_ms, e)))
            .collect()
    }

    /// Counts, clients, duration, rate and frame sizes.
    pub fn info(&self) -> CaptureInfo {
        let frames = self.frames();
        let results = self.results();
        let sizes: Vec<usize> = frames
            .iter()
            .filter_map(|(_, e)| match &e.payload {
                Payload::Frame(f) => Some(f.jpeg.len()),
                _ => None,
            })
            .collect();
        let mut per_client: BTreeMap<String, u64> = BTreeMap::new();
        for (_, e) in &frames {
            *per_client.entry(e.client_id.clone()).or_default() += 1;
        }
        let first = frames.first().map_or(0, |(t, _)| *t);
        let last = frames.last().map_or(0, |(t, _)| *t);
        let duration_s = (last.saturating_sub(first)) as f64 / 1000.0;
        let dropped = results
            .iter()
            .filter(|(_, e)| matches!(e.payload, Payload::Dropped(_)))
            .count() as u64;
        CaptureInfo {
            format_version: self.header.format_version,
            namespace: self.header.namespace.clone(),
            started_at_ms: self.header.started_at_ms,
            tool_version: self.header.tool_version.clone(),
            frames: frames.len() as u64,
            results: results.len() as u64 - dropped,
            dropped,
            clients: per_client,
            duration_s,
            fps: if duration_s > 0.0 {
                frames.len() as f64 / duration_s
            } else {
                0.0
            },
            frame_bytes_min: sizes.iter().copied().min().unwrap_or(0),
            frame_bytes_mean: if sizes.is_empty() {
                0
            } else {
                sizes.iter().sum::<usize>() / sizes.len()
            },
            frame_bytes_max: sizes.iter().copied().max().unwrap_or(0),
            truncated: self.truncated,
        }
    }

    /// Client ids in the capture.
    pub fn clients(&self) -> BTreeSet<String> {
        self.frames()
            .into_iter()
            .map(|(_, e)| e.client_id)
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct CaptureInfo {
    pub format_version: u16,
    pub namespace: String,
    pub started_at_ms: u64,
    pub tool_version: String,
    pub frames: u64,
    pub results: u64,
    pub dropped: u64,
    pub clients: BTreeMap<String, u64>,
    pub duration_s: f64,
    pub fps: f64,
    pub frame_bytes_min: usize,
    pub frame_bytes_mean: usize,
    pub frame_bytes_max: usize,
    pub truncated: bool,
}

impl CaptureInfo {
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = format!(
            "capture format {} from namespace `{}` (vigil {}), started {} ms\n\
             frames {}  results {}  dropped {}  over {:.1} s  ({:.1} fps)\n\
             frame bytes: min {}  mean {}  max {}{}\n",
            self.format_version,
            self.namespace,
            self.tool_version,
            self.started_at_ms,
            self.frames,
            self.results,
            self.dropped,
            self.duration_s,
            self.fps,
            self.frame_bytes_min,
            self.frame_bytes_mean,
            self.frame_bytes_max,
            if self.truncated {
                "\nthe last record was cut short and is skipped"
            } else {
                ""
            }
        );
        let _ = writeln!(out, "clients ({}):", self.clients.len());
        for (c, n) in &self.clients {
            let _ = writeln!(out, "  {c:<32} {n} frames");
        }
        out
    }
}

fn read_block(input: &mut impl Read) -> Result<Option<Vec<u8>>, CaptureError> {
    let mut len = [0u8; 4];
    match input.read(&mut len[..1])? {
        0 => return Ok(None),
        _ => input.read_exact(&mut len[1..])?,
    }
    let len = u32::from_be_bytes(len);
    if len > MAX_RECORD {
        return Err(CaptureError::Corrupt(format!("record length {len}")));
    }
    let mut buf = vec![0u8; len as usize];
    input.read_exact(&mut buf)?;
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> CaptureHeader {
        CaptureHeader {
            format_version: FORMAT_VERSION,
            namespace: "vigil".into(),
            started_at_ms: 1_763_777_000_000,
            tool_version: "0.1.0".into(),
            results: true,
            source: "live".into(),
        }
    }

    #[test]
    fn round_trip_and_a_torn_tail() {
        let mut w = CaptureWriter::new(Vec::new(), &header()).unwrap();
        for i in 0..3 {
            w.write(&CaptureRecord {
                arrived_at_ms: 1000 + i,
                kind: RecordKind::Frame,
                event: vec![i as u8; 10],
            })
            .unwrap();
        }
        let bytes = w.finish().unwrap();
        let c = Capture::read(&bytes[..]).unwrap();
        assert_eq!((c.records.len(), c.truncated), (3, false));
        assert_eq!(c.header, header());
        let cut = Capture::read(&bytes[..bytes.len() - 4]).unwrap();
        assert_eq!((cut.records.len(), cut.truncated), (2, true));
        assert!(matches!(
            Capture::read(&b"NOTACAPT"[..]),
            Err(CaptureError::BadMagic)
        ));
    }
}
