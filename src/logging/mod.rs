//! Run outputs: what a training run writes under `runs/<run_name>/` besides checkpoints.
//!
//! * [`metrics`]: [`MetricsLog`] writes every step to `metrics.jsonl`, `metrics.csv` and a
//!   TensorBoard event file (`train/<key>`), evaluations to `eval.jsonl` (`eval/<name>`), and
//!   trims them back when a run resumes.
//! * [`tensorboard`]: [`TbWriter`], a dependency-free TensorBoard event-file writer, and
//!   [`read_scalars`], a reader that checks every CRC. `tensorboard --logdir runs/` shows the
//!   runs; `wandb sync runs/<run_name>/` uploads one to Weights & Biases.
//! * [`progress`]: [`Progress`], a bar in a terminal, plain lines in logs, or silence.
//! * [`plots`]: [`plot_metrics`] draws `reward.png`, `losses.png`, `weights.png` and
//!   `diversity.png` from the logged metrics.
//! * [`crc32c`]: the CRC-32C (Castagnoli) checksum of TFRecord framing.

pub mod crc32c;
pub mod metrics;
pub mod plots;
pub mod progress;
pub mod tensorboard;

pub use crc32c::{crc32c, masked_crc32c};
pub use metrics::{EVAL_JSONL, METRICS_CSV, METRICS_JSONL, MetricsLog, read_jsonl};
pub use plots::plot_metrics;
pub use progress::{Progress, ProgressMode};
pub use tensorboard::{TbWriter, read_scalars};
