//! Training progress on stderr: a live bar in a terminal, plain lines in logs, or nothing.
//!
//! * [`ProgressMode::Bar`]: an `indicatif` bar with position/total, elapsed time, ETA, steps per
//!   second and a message such as `reward 0.53 loss 0.0123`.
//! * [`ProgressMode::Plain`]: when stderr is not a terminal (a script's log file), one line
//!   every ~1/20 of the run or every 10 s, whichever comes first:
//!   `step 120/1000 (12.0%) elapsed 0:01:02 eta 0:08:10 3.2 steps/s | reward 0.53 loss 0.0123`.
//! * [`ProgressMode::Quiet`]: nothing at all (errors are reported by the caller).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressMode {
    /// A live bar (for a terminal).
    Bar,
    /// Plain lines now and then (for logs).
    Plain,
    /// Nothing.
    Quiet,
}

/// Plain lines per run, at most (plus the last one).
const PLAIN_LINES: u64 = 20;
/// Longest gap between plain lines while steps are coming in.
const PLAIN_EVERY: Duration = Duration::from_secs(10);

/// Progress of a run from `start_step` to `total_steps` (see the module docs).
pub struct Progress {
    mode: ProgressMode,
    bar: Option<ProgressBar>,
    out: Box<dyn Write + Send>,
    total: u64,
    start_step: u64,
    step: u64,
    message: String,
    started: Instant,
    every: u64,
    last_line_step: u64,
    last_line_at: Instant,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines when it is not, nothing when `quiet`.
    pub fn new(total_steps: u64, start_step: u64, quiet: bool) -> Self {
        let mode = if quiet {
            ProgressMode::Quiet
        } else if std::io::stderr().is_terminal() {
            ProgressMode::Bar
        } else {
            ProgressMode::Plain
        };
        Self::with_mode(total_steps, start_step, mode)
    }

    /// Progress shown in the given mode, whatever stderr is.
    pub fn with_mode(total_steps: u64, start_step: u64, mode: ProgressMode) -> Self {
        let start_step = start_step.min(total_steps);
        let bar = (mode == ProgressMode::Bar).then(|| {
            let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise} < {eta_precise}, {per_sec}] {msg}").unwrap_or_else(|_| ProgressStyle::default_bar()).progress_chars("=> ");
            let bar = ProgressBar::with_draw_target(Some(total_steps), ProgressDrawTarget::stderr()).with_style(style).with_position(start_step);
            // record the starting position, then forget it, so that the rate counts only new steps
            bar.set_length(total_steps);
            bar.reset_eta();
            bar
        });
        let now = Instant::now();
        let every = (total_steps - start_step).div_ceil(PLAIN_LINES).max(1);
        Progress { mode, bar, out: Box::new(std::io::stderr()), total: total_steps, start_step, step: start_step, message: String::new(), started: now, every, last_line_step: start_step, last_line_at: now }
    }

    /// Send plain lines and [`println`](Self::println) text to `out` instead of stderr (the bar
    /// always draws on stderr).
    pub fn with_writer(mut self, out: Box<dyn Write + Send>) -> Self {
        self.out = out;
        self
    }

    /// The mode in use.
    pub fn mode(&self) -> ProgressMode {
        self.mode
    }

    /// `step` steps are done; `message` replaces the live message (e.g. `reward 0.53 loss 0.0123`).
    pub fn update(&mut self, step: u64, message: &str) {
        self.step = step;
        if self.message != message {
            self.message = message.to_string();
        }
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.set_message(self.message.clone());
                    bar.set_position(step);
                }
            }
            ProgressMode::Plain => {
                let due = step >= self.last_line_step + self.every || self.last_line_at.elapsed() >= PLAIN_EVERY;
                if due && step != self.last_line_step {
                    self.plain_line();
                }
            }
            ProgressMode::Quiet => {}
        }
    }

    /// Print a line of text above the bar (on its own line in plain mode; not at all when quiet).
    pub fn println(&mut self, msg: &str) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.println(msg);
                }
            }
            ProgressMode::Plain => {
                // losing a progress line is not worth stopping a run for
                let _ = writeln!(self.out, "{msg}");
            }
            ProgressMode::Quiet => {}
        }
    }

    /// End the display: the bar stays on screen at its last position; plain mode prints the last
    /// line if it has not been printed yet.
    pub fn finish(&mut self) {
        match self.mode {
            ProgressMode::Bar => {
                if let Some(bar) = &self.bar {
                    bar.finish();
                }
            }
            ProgressMode::Plain => {
                if self.step != self.last_line_step {
                    self.plain_line();
                }
                let _ = self.out.flush();
            }
            ProgressMode::Quiet => {}
        }
    }

    /// The plain progress line for the current step.
    pub fn status_line(&self) -> String {
        let elapsed = self.started.elapsed().as_secs_f64();
        let done = self.step.saturating_sub(self.start_step);
        let rate = if elapsed > 0.0 { done as f64 / elapsed } else { 0.0 };
        let pct = if self.total > 0 { 100.0 * self.step as f64 / self.total as f64 } else { 100.0 };
        let eta = if rate > 0.0 { hms(self.total.saturating_sub(self.step) as f64 / rate) } else { "?".into() };
        let mut line = format!("step {}/{} ({pct:.1}%) elapsed {} eta {eta} {rate:.2} steps/s", self.step, self.total, hms(elapsed));
        if !self.message.is_empty() {
            line.push_str(" | ");
            line.push_str(&self.message);
        }
        line
    }

    fn plain_line(&mut self) {
        let line = self.status_line();
        let _ = writeln!(self.out, "{line}");
        let _ = self.out.flush();
        self.last_line_step = self.step;
        self.last_line_at = Instant::now();
    }
}

/// `h:mm:ss` of a number of seconds.
fn hms(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}
