//! A reward computed by any program the user writes (their own CLIP score, aesthetic
//! predictor, classifier, ...), run as ONE persistent child process.
//!
//! # Protocol `orwcfm-reward/1`
//!
//! This is a public interface; `examples/rewards/external_reward.py` implements it with the
//! Python standard library only.
//!
//! 1. **Start.** The engine starts the program once, with the user's command (program + arguments,
//!    no shell), the engine's environment plus the user's extra variables, and the engine's
//!    working directory. The same process then answers every batch of the run.
//! 2. **Request.** For each batch the engine writes to the program's **stdin**:
//!    - an 8-byte little-endian unsigned integer `N`;
//!    - `N` bytes: a complete safetensors file holding
//!      - `images`: f32 (little-endian), shape `[B, C, H, W]`, pixels in `[-1, 1]` (models that are
//!        not image models send their samples, `[B, ...]`);
//!      - `labels`: i64, shape `[B]`, the class of each sample — only for class-conditional
//!        models;
//!      - metadata `{"pixel_range": "[-1,1]", "protocol": "orwcfm-reward/1"}`.
//! 3. **Answer.** The program writes to its **stdout** exactly `B` little-endian f32 values
//!    (`4·B` bytes), one reward per image, in the order of the batch, and flushes. Nothing else may
//!    ever be written to stdout: logs go to **stderr**, which the engine reads and keeps (the last
//!    50 lines are quoted in error messages; [`ExternalReward::with_stderr_passthrough`] also
//!    copies them to the engine's stderr).
//! 4. **End.** When the run ends the engine closes the program's stdin; the program should then
//!    exit. Programs still running shortly after are killed.
//!
//! # Errors
//!
//! - the program cannot be started: `cannot start external reward program '<cmd>': ...`;
//! - it exits, or closes its stdout, before answering in full (a short answer included):
//!   `external reward program '<cmd>' exited (<status>) ...`, with the tail of its stderr;
//! - it does not answer within the timeout ([`DEFAULT_TIMEOUT`], 300 s, see
//!   [`ExternalReward::with_timeout`]): it is killed, and the error says
//!   `external reward program '<cmd>' timed out after <N> s ...`.
//!
//! After such an error the process is gone; the next call to `score` starts the program anew.
//! The values themselves are not checked here: [`super::score_checked`] checks the count and
//! that every value is finite.

use std::collections::{HashMap, VecDeque};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow, bail};

use super::Reward;
use crate::io::safetensors::{Out, serialize};
use crate::tensor::{DType, Tensor};

/// The protocol name written into every request's metadata.
pub const PROTOCOL: &str = "orwcfm-reward/1";

/// How long the engine waits for one answer by default (300 s).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// How many lines of the program's stderr are kept for error messages.
pub const STDERR_TAIL_LINES: usize = 50;

/// A reward answered by a user program over stdin/stdout (see the module docs for the protocol).
pub struct ExternalReward {
    command: Vec<String>,
    env: Vec<(String, String)>,
    timeout: Duration,
    passthrough: Arc<AtomicBool>,
    proc: Option<Proc>,
    starts: usize,
}

/// One batch for the I/O thread: the safetensors bytes and the answer's length in bytes.
struct Job {
    body: Vec<u8>,
    answer_len: usize,
}

/// What the I/O thread got back.
enum Answer {
    Ok(Vec<u8>),
    WriteFailed(std::io::Error),
    Short { got: usize, want: usize, err: Option<std::io::Error> },
}

/// A running child with its I/O threads.
struct Proc {
    child: Child,
    jobs: Option<Sender<Job>>,
    answers: Receiver<Answer>,
    stderr_tail: Arc<Mutex<VecDeque<String>>>,
    stderr_done: Receiver<()>,
}

impl Drop for Proc {
    /// Close the program's stdin, give it a moment to exit on its own, then kill and reap it.
    fn drop(&mut self) {
        self.jobs = None; // the I/O thread ends and drops stdin
        if wait_until(&mut self.child, Duration::from_millis(200)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Poll `child` for its exit status for at most `limit`.
fn wait_until(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let end = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) if Instant::now() < end => thread::sleep(Duration::from_millis(5)),
            _ => return None,
        }
    }
}

/// The I/O thread: for each job, write the request to stdin, then read exactly the answer.
/// A separate thread lets the engine give up after the timeout whatever the child does.
fn io_loop(mut stdin: ChildStdin, mut stdout: ChildStdout, jobs: Receiver<Job>, answers: Sender<Answer>) {
    for job in jobs {
        let answer = (|| {
            let len = (job.body.len() as u64).to_le_bytes();
            let sent = stdin.write_all(&len).and_then(|_| stdin.write_all(&job.body)).and_then(|_| stdin.flush());
            if let Err(e) = sent {
                return Answer::WriteFailed(e);
            }
            let want = job.answer_len;
            let mut buf = vec![0u8; want];
            let mut got = 0;
            while got < want {
                match stdout.read(&mut buf[got..]) {
                    Ok(0) => return Answer::Short { got, want, err: None },
                    Ok(n) => got += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Answer::Short { got, want, err: Some(e) },
                }
            }
            Answer::Ok(buf)
        })();
        let failed = !matches!(answer, Answer::Ok(_));
        if answers.send(answer).is_err() || failed {
            break;
        }
    }
}

/// The stderr thread: keep the last lines, optionally copy them to our stderr.
fn stderr_loop(err: ChildStderr, tail: Arc<Mutex<VecDeque<String>>>, pass: Arc<AtomicBool>, prefix: String, done: Sender<()>) {
    let mut r = BufReader::new(err);
    let mut line = Vec::new();
    loop {
        line.clear();
        match r.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {
                let mut s = String::from_utf8_lossy(&line).trim_end_matches(['\n', '\r']).to_string();
                if pass.load(Ordering::Relaxed) {
                    eprintln!("[{prefix}] {s}");
                }
                if s.len() > 2000 {
                    let mut cut = 2000;
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    s.truncate(cut);
                    s.push_str(" …");
                }
                let mut t = tail.lock().unwrap_or_else(|e| e.into_inner());
                if t.len() == STDERR_TAIL_LINES {
                    t.pop_front();
                }
                t.push_back(s);
            }
        }
    }
    let _ = done.send(());
}

/// `prog arg "arg with spaces"` on one line, for messages.
fn display_command(command: &[String]) -> String {
    command.iter().map(|a| if !a.is_empty() && !a.chars().any(|c| c.is_whitespace() || c.is_control() || "'\"\\".contains(c)) { a.clone() } else { format!("{a:?}") }).collect::<Vec<_>>().join(" ")
}

/// How a batch failed.
enum Failure {
    Timeout(usize),
    Closed(String),
}

impl ExternalReward {
    /// Start `command` (program followed by its arguments; no shell is involved) with `env` added
    /// to the engine's environment. The timeout is [`DEFAULT_TIMEOUT`].
    ///
    /// Fails if the command is empty or the program cannot be started.
    pub fn new(command: Vec<String>, env: Vec<(String, String)>) -> Result<Self> {
        if command.first().is_none_or(|p| p.is_empty()) {
            bail!("the external reward needs a command: a program and its arguments (reward_command)");
        }
        let mut r = ExternalReward { command, env, timeout: DEFAULT_TIMEOUT, passthrough: Arc::new(AtomicBool::new(false)), proc: None, starts: 0 };
        r.proc = Some(r.spawn()?);
        Ok(r)
    }

    /// The same reward with another timeout for each answer.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Change the timeout for each answer.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The timeout for each answer.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Also copy every line the program writes on stderr to the engine's stderr, prefixed with
    /// the reward's name (the lines are kept for error messages either way).
    pub fn with_stderr_passthrough(self, on: bool) -> Self {
        self.passthrough.store(on, Ordering::Relaxed);
        self
    }

    /// The command the program was started with.
    pub fn command(&self) -> &[String] {
        &self.command
    }

    /// The process id of the running program, if it is running.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(|p| p.child.id())
    }

    /// How many times the program has been started (1 unless it failed and was restarted).
    pub fn starts(&self) -> usize {
        self.starts
    }

    /// The last lines (at most [`STDERR_TAIL_LINES`]) the running program wrote on stderr.
    pub fn stderr_tail(&self) -> Vec<String> {
        match &self.proc {
            Some(p) => p.stderr_tail.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect(),
            None => Vec::new(),
        }
    }

    fn spawn(&mut self) -> Result<Proc> {
        let shown = display_command(&self.command);
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..]).envs(self.env.iter().map(|(k, v)| (k, v))).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        // its own process group: a Ctrl-C in the terminal stops the trainer (which saves a
        // checkpoint and then ends this program), not the reward program in the middle of a batch
        #[cfg(unix)]
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd.spawn().map_err(|e| anyhow!("cannot start external reward program '{shown}': {e}"))?;
        self.starts += 1;
        let (Some(stdin), Some(stdout), Some(stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("external reward program '{shown}': its standard streams could not be connected");
        };
        let (job_tx, job_rx) = mpsc::channel();
        let (ans_tx, ans_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let spawned = thread::Builder::new().name("reward-io".into()).spawn(move || io_loop(stdin, stdout, job_rx, ans_tx)).and_then(|_| {
            let (t, p, name) = (tail.clone(), self.passthrough.clone(), self.name());
            thread::Builder::new().name("reward-stderr".into()).spawn(move || stderr_loop(stderr, t, p, name, done_tx))
        });
        let proc = Proc { child, jobs: Some(job_tx), answers: ans_rx, stderr_tail: tail, stderr_done: done_rx };
        if let Err(e) = spawned {
            drop(proc);
            bail!("external reward program '{shown}': cannot start its I/O threads: {e}");
        }
        Ok(proc)
    }

    /// The request for one batch: a safetensors file with `images` (and `labels`).
    fn request(x: &Tensor, y: Option<&[usize]>) -> Result<Vec<u8>> {
        let b = x.shape()[0];
        let labels: Option<Vec<i64>> = match y {
            None => None,
            Some(y) if y.len() == b => Some(y.iter().map(|&v| i64::try_from(v).map_err(|_| anyhow!("label {v} does not fit in an i64"))).collect::<Result<_>>()?),
            Some(y) => bail!("external reward: {} labels for a batch of {b} samples", y.len()),
        };
        let shape_b = [b];
        let mut tensors = vec![("images".to_string(), Out::F(x))];
        if let Some(l) = &labels {
            tensors.push(("labels".to_string(), Out::I64(&shape_b, l)));
        }
        let meta: HashMap<String, String> = [("pixel_range", "[-1,1]"), ("protocol", PROTOCOL)].into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        serialize(&tensors, DType::F32, &meta)
    }

    /// Turn a failed batch into an error: collect the exit status (killing the program if
    /// needed) and its last stderr lines. The process is dropped.
    fn fail(&mut self, how: Failure) -> anyhow::Error {
        let shown = display_command(&self.command);
        let Some(mut p) = self.proc.take() else {
            return anyhow!("external reward program '{shown}' is not running");
        };
        let what = match how {
            Failure::Timeout(b) => {
                let _ = p.child.kill();
                let _ = p.child.wait();
                format!(
                    "timed out after {} s without answering a batch of {b} samples (it was killed; \
                     the timeout is configurable)",
                    self.timeout.as_secs_f64()
                )
            }
            Failure::Closed(detail) => match wait_until(&mut p.child, Duration::from_secs(2)) {
                Some(status) => format!("exited ({status}) {detail}"),
                None => {
                    let _ = p.child.kill();
                    let _ = p.child.wait();
                    format!("closed its stdin or stdout but kept running (it was killed) {detail}")
                }
            },
        };
        // Let the stderr thread read what the program said last.
        let _ = p.stderr_done.recv_timeout(Duration::from_millis(500));
        let tail: Vec<String> = p.stderr_tail.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        let said = if tail.is_empty() { " It wrote nothing on stderr.".to_string() } else { format!(" The last {} line(s) of its stderr:\n    {}", tail.len(), tail.join("\n    ")) };
        anyhow!("external reward program '{shown}' {what}.{said}")
    }
}

impl Reward for ExternalReward {
    /// `external:<program>`.
    fn name(&self) -> String {
        format!("external:{}", self.command.first().map(String::as_str).unwrap_or(""))
    }

    fn score(&mut self, x: &Tensor, y: Option<&[usize]>) -> Result<Vec<f32>> {
        let Some(&b) = x.shape().first() else {
            bail!("external reward: samples must have a batch axis, got a scalar");
        };
        if b == 0 {
            return Ok(Vec::new());
        }
        let body = Self::request(x, y)?;
        if self.proc.is_none() {
            self.proc = Some(self.spawn()?);
        }
        let Some(p) = self.proc.as_ref() else {
            bail!("external reward program '{}' is not running", display_command(&self.command));
        };
        let sent = p.jobs.as_ref().is_some_and(|j| j.send(Job { body, answer_len: 4 * b }).is_ok());
        if !sent {
            return Err(self.fail(Failure::Closed(format!("before a batch of {b} samples could be sent"))));
        }
        match p.answers.recv_timeout(self.timeout) {
            Ok(Answer::Ok(bytes)) => Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()),
            Ok(Answer::WriteFailed(e)) => Err(self.fail(Failure::Closed(format!("without reading a batch of {b} samples (writing it failed: {e})")))),
            Ok(Answer::Short { got, want, err }) => {
                let why = err.map(|e| format!(": {e}")).unwrap_or_default();
                Err(self.fail(Failure::Closed(format!("after answering {got} of {want} bytes ({b} f32 rewards expected){why}"))))
            }
            Err(RecvTimeoutError::Timeout) => Err(self.fail(Failure::Timeout(b))),
            Err(RecvTimeoutError::Disconnected) => Err(self.fail(Failure::Closed(format!("while answering a batch of {b} samples")))),
        }
    }
}
