//! The optimiser's one pass over flat arenas on the GPU: `adam_clip_ema_f32` of `kernels/optim.cu`,
//! one launch for the whole model (CPU: `CpuStorage::adam_arena`).

use anyhow::Result;

use super::f32ops::{want_f32, want_len};
use super::gpu::Arg;
use super::storage::{CudaStorage, same_gpu};
use crate::backend::ArenaStep;

/// Clip scale, Adam and EMA over the arenas `p`, `gr`, `m`, `v` (and `ema`), all f32 of one
/// length, in place (each copied first if shared): one kernel launch.
pub fn adam_arena(p: &mut CudaStorage, gr: &CudaStorage, m: &mut CudaStorage, v: &mut CudaStorage, ema: Option<&mut CudaStorage>, h: &ArenaStep) -> Result<()> {
    let mut all = vec![&*p, gr, &*m, &*v];
    if let Some(e) = &ema {
        all.push(&**e);
    }
    let g = same_gpu("adam_arena", &all)?;
    let n = p.elements();
    for (t, what) in all.iter().zip(["the parameters", "the gradients", "the first moments", "the second moments", "the EMA"]) {
        want_f32(t, "adam_arena")?;
        want_len(t, n, "adam_arena", what)?;
    }
    let (pp, mp, vp) = (p.make_mut()?, m.make_mut()?, v.make_mut()?);
    let ep = match ema {
        Some(e) => e.make_mut()?,
        None => 0,
    };
    if n == 0 {
        return Ok(());
    }
    let a = h.adam;
    let args = [
        Arg::Ptr(pp),
        Arg::Ptr(gr.ptr()),
        Arg::Ptr(mp),
        Arg::Ptr(vp),
        Arg::Ptr(ep),
        Arg::I64(n as i64),
        Arg::F32(h.grad_scale),
        Arg::F32(a.step_size),
        Arg::F32(a.beta1),
        Arg::F32(a.beta2),
        Arg::F32(a.eps),
        Arg::F32(a.bc2_sqrt),
        Arg::F32(a.weight_decay),
        Arg::F32(1.0 - h.ema_decay),
        Arg::F32(h.ema_decay),
    ];
    g.launch_n("adam_clip_ema_f32", n, &args)
}
