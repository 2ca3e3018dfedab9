//! TensorBoard event files, written and read without TensorFlow or a protobuf library.
//!
//! A file `events.out.tfevents.<unix seconds>.<hostname>` is a sequence of TFRecords:
//!
//! ```text
//! u64 LE length | u32 LE masked CRC-32C of those 8 bytes | data | u32 LE masked CRC-32C of data
//! ```
//!
//! where each `data` is a protobuf `Event`, encoded here by hand:
//!
//! ```text
//! Event   { double wall_time = 1; int64 step = 2;
//!           oneof { string file_version = 3; Summary summary = 5; SessionLog session_log = 7; } }
//! Summary { repeated Value value = 1; }
//! Value   { string tag = 1; float simple_value = 2; }
//! SessionLog { SessionStatus status = 1; }   // START = 1 marks where a resumed run restarts
//! ```
//!
//! The first record is `file_version = "brain.Event:2"`; the later ones carry scalars as
//! `simple_value`s, which TensorBoard shows under its Scalars tab (or mark a restart). Point TensorBoard at the runs
//! (`tensorboard --logdir runs/`), or upload a run to Weights & Biases with `wandb sync runs/<run>/`,
//! which reads these same files. Several event files in one folder (a resumed run) are fine:
//! TensorBoard reads them in name order, and a [`TbWriter::session_start`] record at the start
//! of the new file makes it drop the points of the old files that the restart overwrote.
//!
//! [`read_scalars`] reads such a file back, checking every CRC; it also understands scalars that
//! TensorFlow 2 writes as one-element float tensors. `scripts/check_tensorboard.py` shows what
//! TensorBoard's own reader makes of a file.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};

use super::crc32c::masked_crc32c;

/// The `file_version` of the first record, as TensorFlow writes it.
pub const FILE_VERSION: &str = "brain.Event:2";

/// Appends scalar summaries to a new TensorBoard event file.
pub struct TbWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TbWriter {
    /// Create `dir` if needed and a new event file in it named
    /// `events.out.tfevents.<unix seconds>.<hostname>` (with `.1`, `.2`, … appended when a file of
    /// that name already exists), and write its `file_version` record.
    pub fn create(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the folder {}", dir.display()))?;
        let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let base = format!("events.out.tfevents.{secs:010}.{}", hostname());
        let mut n = 0u32;
        let (path, file) = loop {
            let name = if n == 0 { base.clone() } else { format!("{base}.{n}") };
            let path = dir.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == ErrorKind::AlreadyExists && n < 10_000 => n += 1,
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        };
        let mut w = TbWriter { path, out: BufWriter::new(file) };
        let mut ev = event_header(0);
        put_bytes(&mut ev, 3, FILE_VERSION.as_bytes());
        w.record(&ev)?;
        w.flush()?;
        Ok(w)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Add one scalar `tag` at `step` (buffered until [`flush`](Self::flush)).
    pub fn scalar(&mut self, tag: &str, step: u64, value: f32) -> Result<()> {
        self.scalars(step, &[(tag, value)])
    }

    /// Add several scalars at `step` as one event (buffered until [`flush`](Self::flush)); an
    /// empty list writes nothing.
    pub fn scalars<S: AsRef<str>>(&mut self, step: u64, values: &[(S, f32)]) -> Result<()> {
        if values.is_empty() {
            return Ok(());
        }
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            put_bytes(&mut value, 1, tag.as_ref().as_bytes());
            put_key(&mut value, 2, 5);
            value.extend_from_slice(&v.to_le_bytes());
            put_bytes(&mut summary, 1, &value);
        }
        let mut ev = event_header(step);
        put_bytes(&mut ev, 5, &summary);
        self.record(&ev)
    }

    /// Mark a restart at `step` (an `Event` with `session_log { status: START }`, as TensorFlow
    /// writes when a run resumes): TensorBoard then drops every point at `step` or later that
    /// earlier event files of the folder hold, so a resumed run shows one clean curve.
    pub fn session_start(&mut self, step: u64) -> Result<()> {
        let mut session_log = Vec::new();
        put_key(&mut session_log, 1, 0);
        put_varint(&mut session_log, 1); // SessionLog.SessionStatus.START
        let mut ev = event_header(step);
        put_bytes(&mut ev, 7, &session_log);
        self.record(&ev)
    }

    /// Write out everything buffered so far.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| format!("cannot write {}", self.path.display()))
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut buf = Vec::with_capacity(data.len() + 16);
        buf.extend_from_slice(&len);
        buf.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        buf.extend_from_slice(data);
        buf.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.out.write_all(&buf).with_context(|| format!("cannot write {}", self.path.display()))
    }
}

/// The machine's name, for the file name (characters other than letters, digits, `.`, `-`, `_`
/// become `_`).
fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok().or_else(|| std::env::var("COMPUTERNAME").ok()))
        .unwrap_or_default();
    let name: String = raw.trim().chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect();
    if name.is_empty() { "localhost".into() } else { name }
}

/// An `Event` with `wall_time` = now and `step` set.
fn event_header(step: u64) -> Vec<u8> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let mut ev = Vec::new();
    put_key(&mut ev, 1, 1);
    ev.extend_from_slice(&now.to_le_bytes());
    if step != 0 {
        put_key(&mut ev, 2, 0);
        put_varint(&mut ev, step);
    }
    ev
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(buf, ((field as u64) << 3) | wire as u64);
}

fn put_bytes(buf: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(buf, field, 2);
    put_varint(buf, bytes.len() as u64);
    buf.extend_from_slice(bytes);
}

/// Every scalar in a TensorBoard event file as `(step, tag, value)`, in file order. Fails on a
/// CRC mismatch, a truncated record or malformed protobuf, naming the byte offset. Values that
/// are not scalars (images, histograms, text) are skipped.
pub fn read_scalars(path: impl AsRef<Path>) -> Result<Vec<(u64, String, f32)>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut out = Vec::new();
    for (offset, data) in records(&bytes).with_context(|| format!("in {}", path.display()))? {
        decode_event(data, &mut out).with_context(|| format!("bad event at byte {offset} of {}", path.display()))?;
    }
    Ok(out)
}

/// Split TFRecord framing into `(offset, data)` pairs, checking both CRCs of every record.
pub fn records(bytes: &[u8]) -> Result<Vec<(usize, &[u8])>> {
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < bytes.len() {
        if bytes.len() - pos < 12 {
            bail!("truncated record header at byte {pos}");
        }
        let len_bytes = &bytes[pos..pos + 8];
        if masked_crc32c(len_bytes) != le32(&bytes[pos + 8..pos + 12]) {
            bail!("CRC mismatch in the length of the record at byte {pos}: the file is corrupt");
        }
        let len = u64::from_le_bytes(len_bytes.try_into()?);
        let start = pos + 12;
        let end = usize::try_from(len).ok().and_then(|l| start.checked_add(l)).filter(|&e| e.checked_add(4).is_some_and(|e4| e4 <= bytes.len()));
        let Some(end) = end else { bail!("truncated record at byte {pos} ({len} bytes of data announced)") };
        let data = &bytes[start..end];
        if masked_crc32c(data) != le32(&bytes[end..end + 4]) {
            bail!("CRC mismatch in the data of the record at byte {pos}: the file is corrupt");
        }
        out.push((pos, data));
        pos = end + 4;
    }
    Ok(out)
}

/// A protobuf field value, as far as the wire format tells.
enum Field<'a> {
    Varint(u64),
    Fixed64([u8; 8]),
    Bytes(&'a [u8]),
    Fixed32([u8; 4]),
}

/// Iterate over the `(field number, value)` pairs of a protobuf message.
fn fields(mut buf: &[u8]) -> impl Iterator<Item = Result<(u64, Field<'_>)>> {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let r = (|| {
            let key = get_varint(&mut buf)?;
            let f = match key & 7 {
                0 => Field::Varint(get_varint(&mut buf)?),
                1 => Field::Fixed64(take(&mut buf, 8)?.try_into()?),
                2 => {
                    let n = usize::try_from(get_varint(&mut buf)?)?;
                    Field::Bytes(take(&mut buf, n)?)
                }
                5 => Field::Fixed32(take(&mut buf, 4)?.try_into()?),
                w => bail!("unsupported protobuf wire type {w}"),
            };
            Ok((key >> 3, f))
        })();
        if r.is_err() {
            buf = &[];
        }
        Some(r)
    })
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if buf.len() < n {
        bail!("protobuf field runs past the end of its message");
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

fn get_varint(buf: &mut &[u8]) -> Result<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let [b, rest @ ..] = *buf else { bail!("protobuf varint runs past the end of its message") };
        *buf = rest;
        v |= ((b & 0x7F) as u64) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    bail!("protobuf varint longer than 10 bytes")
}

fn decode_event(data: &[u8], out: &mut Vec<(u64, String, f32)>) -> Result<()> {
    let mut step = 0u64;
    let mut found = Vec::new();
    for f in fields(data) {
        match f? {
            (2, Field::Varint(s)) => {
                if (s as i64) < 0 {
                    bail!("negative step {}", s as i64);
                }
                step = s;
            }
            (5, Field::Bytes(summary)) => {
                for v in fields(summary) {
                    if let (1, Field::Bytes(value)) = v?
                        && let Some(tv) = decode_value(value)?
                    {
                        found.push(tv);
                    }
                }
            }
            _ => {}
        }
    }
    out.extend(found.into_iter().map(|(t, v)| (step, t, v)));
    Ok(())
}

/// `(tag, value)` of a `Summary.Value` holding a `simple_value` or a one-element float tensor.
fn decode_value(data: &[u8]) -> Result<Option<(String, f32)>> {
    let (mut tag, mut value) = (String::new(), None);
    for f in fields(data) {
        match f? {
            (1, Field::Bytes(t)) => tag = String::from_utf8_lossy(t).into_owned(),
            (2, Field::Fixed32(b)) => value = Some(f32::from_le_bytes(b)),
            (8, Field::Bytes(tensor)) => value = value.or(decode_scalar_tensor(tensor)?),
            _ => {}
        }
    }
    Ok(value.map(|v| (tag, v)))
}

/// The value of a `TensorProto` of dtype float (1) or double (2) holding exactly one element.
fn decode_scalar_tensor(data: &[u8]) -> Result<Option<f32>> {
    let (mut dtype, mut vals, mut content) = (0u64, Vec::new(), &[][..]);
    for f in fields(data) {
        match f? {
            (1, Field::Varint(d)) => dtype = d,
            (4, Field::Bytes(c)) => content = c,
            (5, Field::Fixed32(b)) => vals.push(f32::from_le_bytes(b) as f64),
            (5, Field::Bytes(p)) => vals.extend(p.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)),
            (6, Field::Fixed64(b)) => vals.push(f64::from_le_bytes(b)),
            (6, Field::Bytes(p)) => vals.extend(p.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))),
            _ => {}
        }
    }
    match (dtype, content.len()) {
        (1, 4) => vals.push(f32::from_le_bytes([content[0], content[1], content[2], content[3]]) as f64),
        (2, 8) => vals.push(f64::from_le_bytes(content.try_into()?)),
        (_, 0) => {}
        _ => return Ok(None),
    }
    Ok(match (dtype, vals.as_slice()) {
        (1 | 2, [v]) => Some(*v as f32),
        _ => None,
    })
}
