//! Where CPU time goes, per op class: wall time, calls and page faults of every op the tensor
//! layer runs on the CPU (`tensor/storage.rs` opens one [`scope`] per op), plus finer
//! [`detail`] scopes inside the kernels (convolution algorithm and pass, Winograd transforms
//! against their GEMMs).
//!
//! Off unless [`enable`]d (`bench unet --profile`, or `ORWCFM_CPU_PROFILE=1`); then an op costs
//! two clock reads and one `getrusage`. Only the outermost scope of a thread counts as an op
//! (a fused op that runs other ops is one entry); nested and worker-thread scopes are details,
//! reported inside their op's time. A detail opened on rayon workers sums their CPU time, so
//! parallel details can add up to more than the wall time of their op.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

static ENABLED: AtomicBool = AtomicBool::new(false);
static TABLE: Mutex<Option<HashMap<(bool, String), Stat>>> = Mutex::new(None);

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Totals of one class.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stat {
    pub calls: u64,
    pub ns: u64,
    /// Minor page faults of the whole process while the scope was open (ops only).
    pub faults: u64,
}

/// One row of [`take`]: an op class or a detail.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub detail: bool,
    pub stat: Stat,
}

/// Turn profiling on or off (the table is kept).
pub fn enable(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether scopes record (set by [`enable`] or `ORWCFM_CPU_PROFILE=1` at first use).
pub fn enabled() -> bool {
    static FROM_ENV: std::sync::Once = std::sync::Once::new();
    FROM_ENV.call_once(|| {
        if std::env::var_os("ORWCFM_CPU_PROFILE").is_some_and(|v| v != "0") {
            ENABLED.store(true, Ordering::Relaxed);
        }
    });
    ENABLED.load(Ordering::Relaxed)
}

/// Empty the table.
pub fn reset() {
    *TABLE.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// The table, ops first then details, each by time (largest first); the table is emptied.
pub fn take() -> Vec<Row> {
    let t = TABLE.lock().unwrap_or_else(|e| e.into_inner()).take().unwrap_or_default();
    let mut rows: Vec<Row> = t.into_iter().map(|((detail, name), stat)| Row { name, detail, stat }).collect();
    rows.sort_by(|a, b| a.detail.cmp(&b.detail).then(b.stat.ns.cmp(&a.stat.ns)).then(a.name.cmp(&b.name)));
    rows
}

fn minor_faults() -> u64 {
    #[cfg(target_os = "linux")]
    {
        let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: getrusage writes one rusage into the pointer it is given.
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0 {
            // SAFETY: initialised by the successful call.
            return unsafe { ru.assume_init() }.ru_minflt as u64;
        }
    }
    0
}

/// An open scope; it records when dropped.
pub struct Scope {
    open: Option<(String, bool, Instant, u64)>,
}

fn open(name: &str, force_detail: bool) -> Scope {
    if !enabled() {
        return Scope { open: None };
    }
    let depth = DEPTH.with(|d| {
        let v = d.get();
        d.set(v + 1);
        v
    });
    let is_worker = rayon::current_thread_index().is_some();
    let detail = force_detail || depth > 0 || is_worker;
    let faults = if detail { 0 } else { minor_faults() };
    Scope { open: Some((name.to_string(), detail, Instant::now(), faults)) }
}

/// An op: the outermost scope of the calling thread (nested, it is a detail).
pub fn scope(name: &str) -> Scope {
    open(name, false)
}

/// A detail inside an op (never counted as an op itself).
pub fn detail(name: &str) -> Scope {
    open(name, true)
}

impl Drop for Scope {
    fn drop(&mut self) {
        let Some((name, detail, t0, f0)) = self.open.take() else { return };
        let ns = t0.elapsed().as_nanos() as u64;
        let faults = if detail { 0 } else { minor_faults().saturating_sub(f0) };
        DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        let mut t = TABLE.lock().unwrap_or_else(|e| e.into_inner());
        let s = t.get_or_insert_with(HashMap::new).entry((detail, name)).or_default();
        s.calls += 1;
        s.ns += ns;
        s.faults += faults;
    }
}

/// The op class an op name belongs to, for the per-class summary.
pub fn class_of(name: &str) -> &'static str {
    let n = name.to_ascii_lowercase();
    if n.starts_with("conv2d_backward") {
        "convolution backward (dx + dw)"
    } else if n.starts_with("conv2d") {
        "convolution forward"
    } else if n.contains("attention") || n.contains("softmax") {
        "attention"
    } else if n.contains("norm") {
        "group norm (+ act)"
    } else if n.starts_with("linear") || n.starts_with("matmul") {
        "linear / matmul"
    } else if n.contains("loss") {
        "loss"
    } else if ["concat", "narrow", "permute", "upsample", "avg_pool", "broadcast", "sum_to_shape", "embedding"].iter().any(|p| n.starts_with(p) || n.contains(p)) {
        "data movement (concat, narrow, resample, broadcast)"
    } else {
        "element-wise"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn scopes_nest_and_record() {
        enable(true);
        reset();
        {
            let _a = scope("conv2d_test_op");
            let _b = scope("nested_test_detail");
            let v: Vec<u8> = vec![1; 1 << 16];
            std::hint::black_box(&v);
        }
        let rows = take();
        enable(false);
        let op = rows.iter().find(|r| r.name == "conv2d_test_op").expect("op row");
        let det = rows.iter().find(|r| r.name == "nested_test_detail").expect("detail row");
        assert!(!op.detail && det.detail && op.stat.calls == 1 && det.stat.calls == 1);
        assert!(op.stat.ns >= det.stat.ns);
        assert_eq!(class_of("conv2d_backward"), "convolution backward (dx + dw)");
        assert_eq!(class_of("binary"), "element-wise");
    }
}
