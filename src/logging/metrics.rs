//! The per-step log of a run: `metrics.jsonl`, `metrics.csv` and TensorBoard scalars, kept in
//! step with each other, plus evaluation scalars in `eval.jsonl`.
//!
//! Every record is one JSON object with a `step` field (any `serde::Serialize` struct, such as
//! the trainer's `StepMetrics`, or a `serde_json::Value` object). It becomes
//!
//! * a line of `metrics.jsonl`, exactly as serialized;
//! * a row of `metrics.csv`, whose header is the keys of the first record; a later record with
//!   other keys leaves the missing cells empty and drops the extra keys, so columns never shift;
//! * one TensorBoard event holding every numeric field but `step` as `train/<key>`.
//!
//! Each record is written through to the files before [`MetricsLog::log`] returns, so a crash
//! loses nothing that was logged. On resume, rows past the resumed step are dropped from the
//! JSON lines files (the CSV is rebuilt from what remains) and TensorBoard gets a new event file
//! that starts with a restart marker, so TensorBoard discards the stale points of the old files.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Map, Value};

use super::tensorboard::TbWriter;

/// The per-step metrics file.
pub const METRICS_JSONL: &str = "metrics.jsonl";
/// The same records as a table.
pub const METRICS_CSV: &str = "metrics.csv";
/// Evaluation scalars, one object per evaluation.
pub const EVAL_JSONL: &str = "eval.jsonl";

/// Writes the metrics of one run folder (see the module docs).
pub struct MetricsLog {
    dir: PathBuf,
    jsonl: File,
    csv: File,
    eval: File,
    columns: Option<Vec<String>>,
    tb: TbWriter,
}

impl MetricsLog {
    /// Open the log of `run_dir` (created if needed). With `resume_at_step: None` the run starts
    /// afresh: `metrics.jsonl`, `metrics.csv` and `eval.jsonl` are emptied. With `Some(s)`, rows
    /// with `step > s` are dropped, the CSV is rebuilt from the rows kept, and logging appends
    /// after them, and the new TensorBoard event file starts with a restart marker at step `s + 1`.
    /// Either way a new TensorBoard event file is started.
    pub fn create(run_dir: impl AsRef<Path>, resume_at_step: Option<u64>) -> Result<Self> {
        let dir = run_dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create the run folder {}", dir.display()))?;
        let (kept, kept_eval) = match resume_at_step {
            None => (Vec::new(), Vec::new()),
            Some(s) => (truncate_jsonl(&dir.join(METRICS_JSONL), s)?, truncate_jsonl(&dir.join(EVAL_JSONL), s)?),
        };
        let columns: Option<Vec<String>> = kept.first().map(|r| r.keys().cloned().collect());
        let mut csv_text = String::new();
        if let Some(cols) = &columns {
            csv_text.push_str(&csv_line(cols.iter().map(|c| csv_cell(&Value::String(c.clone())))));
            for r in &kept {
                csv_text.push_str(&csv_row(cols, r));
            }
        }
        write_atomic(&dir.join(METRICS_CSV), csv_text.as_bytes())?;
        let jsonl_text: String = kept.iter().map(|r| format!("{}\n", Value::Object(r.clone()))).collect();
        write_atomic(&dir.join(METRICS_JSONL), jsonl_text.as_bytes())?;
        let eval_text: String = kept_eval.iter().map(|r| format!("{}\n", Value::Object(r.clone()))).collect();
        write_atomic(&dir.join(EVAL_JSONL), eval_text.as_bytes())?;
        let open = |name: &str| {
            let p = dir.join(name);
            OpenOptions::new().append(true).open(&p).with_context(|| format!("cannot open {}", p.display()))
        };
        let mut tb = TbWriter::create(&dir)?;
        if let Some(s) = resume_at_step {
            tb.session_start(s + 1)?;
            tb.flush()?;
        }
        Ok(MetricsLog { jsonl: open(METRICS_JSONL)?, csv: open(METRICS_CSV)?, eval: open(EVAL_JSONL)?, columns, tb, dir })
    }

    /// The run folder.
    pub fn run_dir(&self) -> &Path {
        &self.dir
    }

    /// The TensorBoard event file this log writes.
    pub fn tensorboard_path(&self) -> &Path {
        self.tb.path()
    }

    /// Log one record: it must serialize to a JSON object with a non-negative integer `step`.
    pub fn log<T: Serialize + ?Sized>(&mut self, record: &T) -> Result<()> {
        // serialize to text first: `f32` fields keep their short form (0.33333334, not
        // 0.3333333432674408), which parsing the text back preserves
        let mut line = serde_json::to_string(record).context("cannot turn the metrics record into JSON")?;
        let value: Value = serde_json::from_str(&line).context("cannot read back the metrics record")?;
        let Value::Object(map) = value else { bail!("a metrics record must be a JSON object, not {value}") };
        let step = step_of(&map).context("a metrics record needs a non-negative integer `step`")?;

        line.push('\n');
        self.jsonl.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", self.dir.join(METRICS_JSONL).display()))?;

        let mut csv = String::new();
        let cols = self.columns.get_or_insert_with(|| {
            let cols: Vec<String> = map.keys().cloned().collect();
            csv.push_str(&csv_line(cols.iter().map(|c| csv_cell(&Value::String(c.clone())))));
            cols
        });
        csv.push_str(&csv_row(cols, &map));
        self.csv.write_all(csv.as_bytes()).with_context(|| format!("cannot write {}", self.dir.join(METRICS_CSV).display()))?;

        let scalars: Vec<(String, f32)> = map.iter().filter(|(k, _)| k.as_str() != "step").filter_map(|(k, v)| v.as_f64().map(|x| (format!("train/{k}"), x as f32))).collect();
        self.tb.scalars(step, &scalars)?;
        self.tb.flush()
    }

    /// Log evaluation scalars at `step`: one line `{"step": step, name: value, …}` of
    /// `eval.jsonl` and TensorBoard scalars `eval/<name>`. Non-finite values are written as
    /// `null` in the JSON and skipped in TensorBoard.
    pub fn log_eval(&mut self, step: u64, values: &[(&str, f64)]) -> Result<()> {
        let mut map = Map::new();
        map.insert("step".into(), Value::from(step));
        for (name, v) in values {
            map.insert((*name).to_string(), serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number));
        }
        let line = format!("{}\n", Value::Object(map));
        self.eval.write_all(line.as_bytes()).with_context(|| format!("cannot write {}", self.dir.join(EVAL_JSONL).display()))?;
        let scalars: Vec<(String, f32)> = values.iter().filter(|(_, v)| v.is_finite()).map(|(n, v)| (format!("eval/{n}"), *v as f32)).collect();
        self.tb.scalars(step, &scalars)?;
        self.tb.flush()
    }

    /// Flush the TensorBoard writer (the JSON and CSV files are written through already).
    pub fn flush(&mut self) -> Result<()> {
        self.tb.flush()
    }
}

/// The `step` of a record, if it is a non-negative integer.
fn step_of(map: &Map<String, Value>) -> Option<u64> {
    map.get("step").and_then(Value::as_u64)
}

/// The JSON objects of a JSON lines file, in order (empty when the file does not exist). Lines
/// that are not objects, such as a line cut short by a crash, are skipped with a warning.
pub fn read_jsonl(path: &Path) -> Result<Vec<Map<String, Value>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut out = Vec::new();
    let mut bad = 0usize;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => out.push(m),
            _ => bad += 1,
        }
    }
    if bad > 0 {
        eprintln!("warning: skipped {bad} unreadable line(s) of {}", path.display());
    }
    Ok(out)
}

/// Keep the records of a JSON lines file with `step <= last` (records without a step are kept).
fn truncate_jsonl(path: &Path, last: u64) -> Result<Vec<Map<String, Value>>> {
    Ok(read_jsonl(path)?.into_iter().filter(|r| step_of(r).is_none_or(|s| s <= last)).collect())
}

/// Replace `path` with `bytes` through a temporary file and a rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot replace {}", path.display()))
}

/// A CSV row of `record` under the header `cols` (missing keys give empty cells).
fn csv_row(cols: &[String], record: &Map<String, Value>) -> String {
    csv_line(cols.iter().map(|c| record.get(c).map_or(String::new(), csv_cell)))
}

fn csv_line(cells: impl Iterator<Item = String>) -> String {
    let mut s = cells.collect::<Vec<_>>().join(",");
    s.push('\n');
    s
}

/// One CSV cell: numbers and booleans as JSON writes them, `null` empty, strings as they are
/// and nested values as JSON, quoted (RFC 4180) when they hold a comma, quote or line break.
fn csv_cell(v: &Value) -> String {
    let s = match v {
        Value::Null => return String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if s.contains([',', '"', '\n', '\r']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s }
}
