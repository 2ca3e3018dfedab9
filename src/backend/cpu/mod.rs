//! The CPU reference backend: plain slices in, plain slices out, parallel with rayon.
//!
//! Every function here is a kernel with a matching backward kernel; the autograd layer
//! (`crate::autograd`) wires them into the tape.
pub mod attention;
pub mod buf;
pub mod conv;
pub mod elementwise;
pub mod fused;
pub mod gemm;
pub mod isa;
pub mod norm;
pub mod profile;
pub mod simd;
pub mod winograd;
pub mod winograd4;

/// Keep freed memory for reuse instead of handing it back to the kernel: glibc serves blocks
/// above its mmap threshold (128 KiB, rising only as such blocks are freed) with fresh `mmap`s
/// and trims the heap top, so every step's activations would page-fault in anew (measured with
/// `bench unet --profile`: tens of thousands of faults per CIFAR-10 training step). Blocks of
/// up to 32 MiB (glibc's ceiling) now come from the heap, which is never trimmed: the resident
/// size stays at its peak (live memory at its peak plus the heap's fragmentation; the CIFAR-10
/// step's peak went from 521 to about 525 MiB). Called once by the CLI; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            // SAFETY: mallopt only changes allocator parameters; called before heavy allocation.
            unsafe {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
                libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            }
        });
    }
}

/// Work below this many elements stays on one thread.
pub const PAR_MIN: usize = 1 << 15;

/// `Σ_item f(item)` into an accumulator of `len` floats, where `f(acc, item, first)` adds one
/// item's contribution, or, when `first`, writes it over `acc` (every value, reading none: the
/// accumulator is not zeroed first, a pass over megabytes). Items are dealt round-robin to one
/// group per worker thread, each group with a single accumulator (not one per rayon split:
/// accumulators can be megabytes), then summed.
pub fn par_accumulate(items: usize, len: usize, f: impl Fn(&mut [f32], usize, bool) + Sync) -> Vec<f32> {
    let mut partial = par_partials(items, len, f);
    let mut acc = partial.pop().expect("at least one group");
    for p in &partial {
        elementwise::add_assign(&mut acc, p);
    }
    acc
}
/// [`par_accumulate`]'s per-thread sums, not yet added up (at least one): for a caller that
/// reads them once anyway and can add them there, in parallel.
pub fn par_partials(items: usize, len: usize, f: impl Fn(&mut [f32], usize, bool) + Sync) -> Vec<Vec<f32>> {
    use rayon::prelude::*;
    let groups = rayon::current_num_threads().clamp(1, items.max(1));
    (0..groups)
        .into_par_iter()
        .map(|gi| {
            let mut mine = (gi..items).step_by(groups);
            let Some(first) = mine.next() else {
                return vec![0.0f32; len]; // no items: the sum is zero
            };
            let mut acc: Vec<f32> = Vec::with_capacity(len);
            // SAFETY: the slice is the allocation's `len` floats; f32 has no invalid values, and
            // `f` with `first` set writes every one of them before it reads any.
            f(unsafe { std::slice::from_raw_parts_mut(acc.as_mut_ptr(), len) }, first, true);
            // SAFETY: all `len` values were written just above.
            unsafe { acc.set_len(len) };
            for item in mine {
                f(&mut acc, item, false);
            }
            acc
        })
        .collect()
}
/// A vector of `len` floats filled in parallel, chunk by chunk, by `f(index, chunk)` (chunks of
/// `chunk` floats, the last possibly shorter), with `f`'s results in order; the memory is not
/// zeroed first (a whole pass over the output, a few percent of a U-Net step). `f` must write
/// every value of its chunk before reading any.
pub fn par_fill_chunks<R: Send>(len: usize, chunk: usize, f: impl Fn(usize, &mut [f32]) -> R + Sync) -> (Vec<f32>, Vec<R>) {
    use rayon::prelude::*;
    let mut v: Vec<f32> = Vec::with_capacity(len);
    if len == 0 {
        return (v, Vec::new());
    }
    let chunk = chunk.max(1);
    let p = winograd::SyncPtr(v.as_mut_ptr());
    let r = (0..len.div_ceil(chunk))
        .into_par_iter()
        .map(|i| {
            let p = &p;
            let n = chunk.min(len - i * chunk);
            // SAFETY: chunk i, [i·chunk, i·chunk + n), lies in the allocation and is handed to
            // this task alone; f32 has no invalid values and `f` writes before it reads.
            f(i, unsafe { std::slice::from_raw_parts_mut(p.0.add(i * chunk), n) })
        })
        .collect();
    // SAFETY: the chunks cover all `len` values and `f` wrote each of them.
    unsafe { v.set_len(len) };
    (v, r)
}

pub mod storage;
pub use storage::CpuStorage;
