//! Run outputs: CRC-32C, TensorBoard event files (our writer, our reader, and a file written by
//! TensorBoard's own writer), the metrics log with its CSV and resume, the figures, and progress
//! reporting without a terminal.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use orwcfm_fast::logging::tensorboard::records;
use orwcfm_fast::logging::{MetricsLog, Progress, ProgressMode, TbWriter, crc32c, masked_crc32c, plot_metrics, read_scalars};
use serde::Serialize;
use serde_json::json;

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("orwcfm-logging-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents.")).collect();
    v.sort();
    v
}

/// `(step, tag, bits of the value)`, so that floats compare exactly.
fn bits(v: &[(u64, String, f32)]) -> Vec<(u64, String, u32)> {
    v.iter().map(|(s, t, x)| (*s, t.clone(), x.to_bits())).collect()
}

fn owned(v: &[(u64, &str, f32)]) -> Vec<(u64, String, f32)> {
    v.iter().map(|(s, t, x)| (*s, t.to_string(), *x)).collect()
}

const MASKED_CHECK: u32 = 0xC78A_B0E5;

#[test]
fn crc32c_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(crc32c(b""), 0);
    // RFC 3720 (iSCSI) test vectors
    assert_eq!(crc32c(&[0u8; 32]), 0x8A91_36AA);
    assert_eq!(crc32c(&[0xFFu8; 32]), 0x62A8_AB43);
    // ((crc >> 15) | (crc << 17)) + 0xa282ead8 of 0xE3069283, worked out by hand
    assert_eq!(masked_crc32c(b"123456789"), MASKED_CHECK);
}

#[test]
fn tensorboard_round_trip() {
    let dir = tmpdir("roundtrip");
    let mut w = TbWriter::create(&dir).unwrap();
    let name = w.path().file_name().unwrap().to_string_lossy().into_owned();
    assert!(name.starts_with("events.out.tfevents."), "{name}");
    w.scalar("train/loss", 0, 1.0).unwrap();
    w.scalars(5, &[("train/reward", 0.1f32), ("train/tiny", -3.5e-7), ("train/big", f32::MAX)]).unwrap();
    w.scalar("eval/diversity", 1 << 40, std::f32::consts::PI).unwrap();
    w.scalars::<&str>(6, &[]).unwrap();
    w.flush().unwrap();
    let path = w.path().to_path_buf();
    drop(w);

    let got = read_scalars(&path).unwrap();
    let want = owned(&[(0, "train/loss", 1.0), (5, "train/reward", 0.1), (5, "train/tiny", -3.5e-7), (5, "train/big", f32::MAX), (1 << 40, "eval/diversity", std::f32::consts::PI)]);
    assert_eq!(bits(&got), bits(&want));

    // first record: file_version, then one record per call with values
    let bytes = std::fs::read(&path).unwrap();
    let recs = records(&bytes).unwrap();
    assert_eq!(recs.len(), 4);
    assert!(recs[0].1.windows(13).any(|w| w == b"brain.Event:2"));

    // a second writer in the same second gets its own file
    let w2 = TbWriter::create(&dir).unwrap();
    assert_ne!(w2.path(), path.as_path());
    assert_eq!(event_files(&dir).len(), 2);
}

#[test]
fn reader_decodes_tensorboard_fixture() {
    // written by scripts/make_tensorboard_fixture.py with tensorboard's EventFileWriter
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard/events.out.tfevents.fixture");
    let got = read_scalars(&path).unwrap();
    let want = owned(&[
        (0, "train/loss", 1.5),
        (1, "train/loss", 0.75),
        (1, "train/reward", -0.25),
        (2, "train/loss", 0.1),
        (2, "train/reward", 3.0e-5),
        (1_000_000, "eval/diversity", 123_456.79), // 123456.789 in the script: the same f32
        (7, "tf2/accuracy", 0.875),
    ]);
    assert_eq!(bits(&got), bits(&want));
}

#[test]
fn flipped_byte_fails_with_crc_error() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tensorboard/events.out.tfevents.fixture");
    let good = std::fs::read(&path).unwrap();
    let dir = tmpdir("corrupt");
    let bad_path = dir.join("events.out.tfevents.corrupt");
    let recs = records(&good).unwrap();
    let (off, data) = recs[2];
    // a byte of the length, of the length's CRC, of the data, of the data's CRC
    for pos in [off, off + 9, off + 12 + data.len() / 2, off + 12 + data.len() + 1] {
        let mut bytes = good.clone();
        bytes[pos] ^= 0x10;
        std::fs::write(&bad_path, &bytes).unwrap();
        let err = read_scalars(&bad_path).expect_err("a corrupt file must not read");
        assert!(format!("{err:#}").contains("CRC mismatch"), "byte {pos}: {err:#}");
    }
    // a file cut short is an error too
    std::fs::write(&bad_path, &good[..good.len() - 3]).unwrap();
    let err = read_scalars(&bad_path).expect_err("a truncated file must not read");
    assert!(format!("{err:#}").contains("truncated"), "{err:#}");
}

#[derive(Serialize)]
struct Row {
    step: u64,
    loss: f32,
    reward: f64,
    note: String,
    refreshed: bool,
}

fn row(step: u64) -> Row {
    Row { step, loss: 1.0 / (step as f32 + 1.0), reward: step as f64 * 0.5, note: "a,\"b\"".into(), refreshed: step.is_multiple_of(2) }
}

#[test]
fn metrics_log_writes_jsonl_csv_and_events() {
    let dir = tmpdir("metrics");
    let mut log = MetricsLog::create(&dir, None).unwrap();
    log.log(&row(1)).unwrap();
    log.log(&row(2)).unwrap();
    // other keys: `reward` missing, `extra` not in the header
    log.log(&json!({"step": 3, "loss": 0.25, "extra": 9, "refreshed": true})).unwrap();
    log.log_eval(3, &[("diversity", 0.5), ("reward", 2.0)]).unwrap();
    assert!(log.log(&json!({"loss": 1.0})).is_err(), "a record without a step is refused");

    let jsonl = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = jsonl.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0], serde_json::to_value(row(1)).unwrap());
    assert_eq!(lines[2]["extra"], 9);

    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let csv: Vec<&str> = csv.lines().collect();
    assert_eq!(csv, ["step,loss,reward,note,refreshed", "1,0.5,0.5,\"a,\"\"b\"\"\",false", "2,0.33333334,1.0,\"a,\"\"b\"\"\",true", "3,0.25,,,true"]);

    let eval = std::fs::read_to_string(dir.join("eval.jsonl")).unwrap();
    assert_eq!(eval.trim(), r#"{"step":3,"diversity":0.5,"reward":2.0}"#);

    let files = event_files(&dir);
    assert_eq!(files.len(), 1);
    assert_eq!(files[0].as_path(), log.tensorboard_path());
    let got = read_scalars(&files[0]).unwrap();
    let want = owned(&[
        (1, "train/loss", 0.5),
        (1, "train/reward", 0.5),
        (2, "train/loss", 1.0 / 3.0),
        (2, "train/reward", 1.0),
        (3, "train/loss", 0.25),
        (3, "train/extra", 9.0),
        (3, "eval/diversity", 0.5),
        (3, "eval/reward", 2.0),
    ]);
    assert_eq!(bits(&got), bits(&want));
}

#[test]
fn metrics_log_resume_truncates() {
    let dir = tmpdir("resume");
    {
        let mut log = MetricsLog::create(&dir, None).unwrap();
        for s in 1..=10 {
            log.log(&row(s)).unwrap();
            if s % 5 == 0 {
                log.log_eval(s, &[("diversity", s as f64)]).unwrap();
            }
        }
    }
    // a crash left half a line behind
    std::fs::OpenOptions::new().append(true).open(dir.join("metrics.jsonl")).unwrap().write_all(b"{\"step\": 11, \"lo").unwrap();

    let mut log = MetricsLog::create(&dir, Some(6)).unwrap();
    let steps = |name: &str| -> Vec<u64> {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
    };
    assert_eq!(steps("metrics.jsonl"), (1..=6).collect::<Vec<_>>());
    assert_eq!(steps("eval.jsonl"), [5]);
    log.log(&row(7)).unwrap();
    log.log(&json!({"step": 8, "loss": 0.125})).unwrap();
    assert_eq!(steps("metrics.jsonl"), (1..=8).collect::<Vec<_>>());

    let csv = std::fs::read_to_string(dir.join("metrics.csv")).unwrap();
    let csv: Vec<&str> = csv.lines().collect();
    assert_eq!(csv.len(), 9, "{csv:?}");
    assert_eq!(csv[0], "step,loss,reward,note,refreshed");
    let first_cells: Vec<&str> = csv[1..].iter().map(|l| l.split(',').next().unwrap()).collect();
    assert_eq!(first_cells, ["1", "2", "3", "4", "5", "6", "7", "8"]);
    assert_eq!(csv[8], "8,0.125,,,");

    let files = event_files(&dir);
    assert_eq!(files.len(), 2, "a resumed run gets a second event file");
    let new: Vec<u64> = read_scalars(log.tensorboard_path()).unwrap().iter().map(|x| x.0).collect();
    assert_eq!(new, [7, 7, 8]);
    // file_version, the restart marker (so TensorBoard drops steps >= 7 of the old file), 7, 8
    let bytes = std::fs::read(log.tensorboard_path()).unwrap();
    let recs = records(&bytes).unwrap();
    assert_eq!(recs.len(), 4);
    assert!(recs[1].1.ends_with(&[0x10, 7, 0x3A, 2, 0x08, 1]), "{:?}", recs[1].1);

    // starting afresh empties the files
    drop(log);
    let _log = MetricsLog::create(&dir, None).unwrap();
    assert_eq!(std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap(), "");
    assert_eq!(std::fs::read_to_string(dir.join("metrics.csv")).unwrap(), "");
    assert_eq!(std::fs::read_to_string(dir.join("eval.jsonl")).unwrap(), "");
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];

#[test]
fn plot_metrics_writes_pngs() {
    let dir = tmpdir("plots");
    let mut text = String::new();
    for s in 1..=150u64 {
        let x = s as f64;
        let rec = json!({
            "step": s, "reward_mean": x.ln(), "reward_max": x.ln() + 1.0, "reward_min": x.ln() - 1.0,
            "fm_loss": 1.0 / x, "w2_loss": 0.01 * x.sqrt(), "total_loss": 1.0 / x + 0.005 * x.sqrt(),
            "weight_mean": 1.0, "weight_max": 2.0 + (x * 0.3).sin(),
        });
        text.push_str(&format!("{rec}\n"));
    }
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
    let eval: String = (1..=5).map(|e| format!("{}\n", json!({"step": e * 30, "diversity": 1.0 / e as f64, "diversity_l2": 0.5}))).collect();
    std::fs::write(dir.join("eval.jsonl"), eval).unwrap();

    let paths = plot_metrics(&dir).unwrap();
    let names: Vec<String> = paths.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["reward.png", "losses.png", "weights.png", "diversity.png"]);
    for p in &paths {
        let bytes = std::fs::read(p).unwrap();
        assert!(bytes.len() > 1000, "{}", p.display());
        assert_eq!(bytes[..8], PNG_SIGNATURE, "{}", p.display());
    }

    // only rewards logged, no eval: the other figures are skipped
    let dir = tmpdir("plots-partial");
    std::fs::write(dir.join("metrics.jsonl"), "{\"step\":1,\"reward_mean\":0.5}\n{\"step\":2,\"reward_mean\":0.7}\n").unwrap();
    let paths = plot_metrics(&dir).unwrap();
    assert_eq!(paths, [dir.join("reward.png")]);
    assert_eq!(std::fs::read(&paths[0]).unwrap()[..8], PNG_SIGNATURE);
}

/// A `Write` whose bytes the test can read afterwards.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn progress_without_terminal() {
    let cap = Captured::default();
    let mut p = Progress::with_mode(1000, 0, ProgressMode::Plain).with_writer(Box::new(cap.clone()));
    p.println("starting");
    for s in 1..=997 {
        p.update(s, &format!("reward {:.2} loss {:.4}", s as f64 / 1000.0, 1.0 / s as f64));
    }
    p.finish();
    let text = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "starting");
    let progress = &lines[1..];
    assert!((19..=21).contains(&progress.len()), "{} progress lines:\n{text}", progress.len());
    assert!(progress[0].starts_with("step 50/1000 (5.0%)"), "{}", progress[0]);
    let last = progress.last().unwrap();
    assert!(last.starts_with("step 997/1000 (99.7%)") && last.contains("eta ") && last.ends_with("| reward 1.00 loss 0.0010"), "{last}");

    // resumed half-way: lines count only the remaining steps
    let cap = Captured::default();
    let mut p = Progress::with_mode(1000, 500, ProgressMode::Plain).with_writer(Box::new(cap.clone()));
    for s in 501..=1000 {
        p.update(s, "");
    }
    p.finish();
    let n = String::from_utf8(cap.0.lock().unwrap().clone()).unwrap().lines().count();
    assert_eq!(n, 20);

    // quiet prints nothing at all
    let cap = Captured::default();
    let mut p = Progress::with_mode(10, 0, ProgressMode::Quiet).with_writer(Box::new(cap.clone()));
    p.println("hidden");
    for s in 1..=10 {
        p.update(s, "x");
    }
    p.finish();
    assert!(cap.0.lock().unwrap().is_empty());

    // the default constructor and the bar must not panic whatever stderr is
    for quiet in [true, false] {
        let mut p = Progress::new(5, 2, quiet);
        for s in 3..=5 {
            p.update(s, "reward 0.53 loss 0.0123");
        }
        p.println("done");
        p.finish();
    }
    let mut p = Progress::with_mode(3, 0, ProgressMode::Bar);
    p.update(3, "m");
    p.finish();
}
