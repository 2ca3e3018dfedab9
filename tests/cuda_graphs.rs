//! CUDA graphs on the GPU or, without one, on the simulated GPU (which emulates capture: the
//! capturing thread's launches, GEMMs and device copies are recorded, not run; the operations
//! CUDA refuses during capture are refused; a replay runs the recording in order).
//!
//! - the capture infrastructure: a replay computes bitwise what the eager ops computed, reads its
//!   inputs at replay time, refuses uploads, downloads, syncs and fresh driver allocations (the
//!   GPU stays usable), keeps its memory private until it drops;
//! - the fixed-grid sampler (`flow::ode_graph`): Euler, midpoint and RK4 replays are bitwise the
//!   eager solves for fresh x0, see in-place weight updates, drop their graph when the weights
//!   are replaced, and fall back to eager solves when the capture is refused;
//! - the trainer with graphs samples bitwise what it samples without them.

mod common;

use std::sync::{Arc, MutexGuard};

use orwcfm_fast::backend::cuda::Gpu;
use orwcfm_fast::flow::ode::{OdeSolver, odeint};
use orwcfm_fast::flow::ode_graph::{clear_sampler_graphs, odeint_graphed, sampler_graph_stats, set_graphs_enabled};
use orwcfm_fast::nn::{Init, UNetConfig, UNetModel, VelocityField};
use orwcfm_fast::optim::Adam;
use orwcfm_fast::orw::step_graph::step_graph_stats;
use orwcfm_fast::orw::{OrwConfig, Trainer};
use orwcfm_fast::reward::FnReward;
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::{DType, Device, Storage, Tensor};

const DEV: Device = Device::Cuda(0);

/// The GPU (simulated without one), one test at a time (the graph counters are process-wide),
/// with the sampler's graphs as the environment says and none cached.
fn gpu(test: &str) -> Option<(Arc<Gpu>, MutexGuard<'static, ()>)> {
    let r = common::gpu(test)?;
    set_graphs_enabled(None);
    clear_sampler_graphs();
    Some(r)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_cpu().unwrap().values().unwrap().iter().map(|v| v.to_bits()).collect()
}

fn ptr(t: &Tensor) -> u64 {
    match t.storage() {
        Storage::Cuda(c) => c.ptr(),
        Storage::Cpu(_) => panic!("not on the GPU"),
    }
}

fn rnd(shape: &[usize], rng: &mut Rng) -> Tensor {
    Tensor::randn(shape, rng).to_device(DEV).unwrap()
}

/// Some work of every kind a graph holds: kernels (element-wise, broadcast, reductions into a
/// scalar), a GEMM, a device copy, a buffer freed and allocated again inside.
fn work(a: &Tensor, b: &Tensor) -> Tensor {
    let c = a.matmul(b).unwrap(); // [5, 7]
    let d = c.add(&c.mul_scalar(0.25).unwrap()).unwrap().unary(orwcfm_fast::backend::UnaryOp::Silu, 0.0).unwrap();
    drop(c);
    let e = d.narrow(1, 2, 4).unwrap(); // a strided gather
    let s = e.sum_all().unwrap().broadcast_to(&[5, 4]).unwrap();
    Tensor::concat(&[e.sub(&s).unwrap(), d.narrow(1, 0, 3).unwrap()], 1).unwrap()
}

#[test]
fn a_replay_computes_bitwise_what_the_eager_ops_computed_and_reads_its_inputs_then() {
    let Some((g, _one)) = gpu("replay") else { return };
    let mut rng = Rng::new(1);
    let (a, b) = (rnd(&[5, 3], &mut rng), rnd(&[3, 7], &mut rng));
    // the warm-up (other values, the same shapes): the cache then holds the blocks
    drop(work(&rnd(&[5, 3], &mut rng), &b));
    let before = g.pool_stats();
    let cap = g.begin_capture().unwrap();
    assert!(g.is_capturing());
    let out = work(&a, &b);
    let graph = cap.end().unwrap();
    assert!(!g.is_capturing());
    let after = g.pool_stats();
    assert_eq!(after.raw_allocs, before.raw_allocs, "the capture went to the driver");
    assert!(after.bytes_in_graphs > before.bytes_in_graphs, "the graph owns no memory");
    let stale = bits(&out);
    let want = bits(&work(&a, &b)); // the eager ops
    if let Some(n) = graph.recorded_ops() {
        // the simulated GPU records instead of running: the output holds what its block held
        assert!(n >= 8, "{n} operations recorded");
        assert_ne!(stale, want, "a captured kernel ran during the capture");
    }
    graph.replay().unwrap();
    assert_eq!(bits(&out), want, "the replay differs from the eager ops");
    // new input values, written in place into the buffer the graph reads: the replay sees them
    let a2 = rnd(&[5, 3], &mut rng);
    g.copy_into(ptr(&a), ptr(&a2), 15).unwrap();
    graph.replay().unwrap();
    let want2 = bits(&work(&a2, &b));
    assert_ne!(want2, want);
    assert_eq!(bits(&out), want2, "the second replay did not read the new input");
    drop(out);
    drop(graph);
    assert_eq!(g.pool_stats().bytes_in_graphs, before.bytes_in_graphs, "the graph's memory did not come back");
}

#[test]
fn refused_operations_end_the_capture_with_an_error_and_leave_the_gpu_usable() {
    let Some((g, _one)) = gpu("refusals") else { return };
    let mut rng = Rng::new(2);
    let (a, b) = (rnd(&[5, 3], &mut rng), rnd(&[3, 7], &mut rng));
    let want = bits(&work(&a, &b));
    let base = g.pool_stats();
    type Op<'a> = Box<dyn Fn() -> anyhow::Result<()> + 'a>;
    let ops: Vec<(&str, Op)> = vec![
        ("host-to-device", Box::new(|| Tensor::from_vec(vec![1.0; 9], &[9]).to_device(DEV).map(drop))),
        ("device-to-host", Box::new(|| a.to_cpu().map(drop))),
        ("stream synchronisation", Box::new(|| DEV.synchronize())),
        // a size class nothing has used: only the driver could serve it
        ("fresh driver allocation", Box::new(|| Tensor::full_on(&[3_333_331], 1.0, DType::F32, DEV).map(drop))),
    ];
    for (what, op) in &ops {
        let cap = g.begin_capture().unwrap();
        let partial = work(&a, &b); // some captured work before the refusal
        let e = op().expect_err(what);
        assert!(format!("{e:#}").contains(what) && format!("{e:#}").contains("capture"), "{what}: {e:#}");
        drop(partial);
        let e = cap.end().expect_err("a refused capture instantiated");
        assert!(format!("{e:#}").contains(what), "{what}: end says {e:#}");
        assert!(!g.is_capturing());
        // usable: eager work runs (and the refused operation itself works again)
        assert_eq!(bits(&work(&a, &b)), want, "after refusing a {what}");
        op().unwrap_or_else(|e| panic!("{what} after the capture: {e:#}"));
        assert_eq!(g.pool_stats().bytes_in_graphs, base.bytes_in_graphs, "{what}: the abandoned capture kept memory");
    }
    // an error inside: the capture dropped without ending is abandoned
    {
        let _cap = g.begin_capture().unwrap();
        let _ = work(&a, &b);
        assert!(g.begin_capture().is_err(), "two captures at once");
    }
    assert!(!g.is_capturing());
    assert_eq!(bits(&work(&a, &b)), want);
}

#[test]
fn graph_memory_is_not_reused_by_eager_work_until_the_graph_drops() {
    let Some((g, _one)) = gpu("memory") else { return };
    let mut rng = Rng::new(3);
    let (a, b) = (rnd(&[5, 3], &mut rng), rnd(&[3, 7], &mut rng));
    drop(work(&a, &b));
    let cap = g.begin_capture().unwrap();
    let out = work(&a, &b);
    let graph = cap.end().unwrap();
    let owned = ptr(&out);
    drop(out); // parked in the graph, not cached
    // eager work of the same shapes gets other blocks while the graph lives
    let mut kept = Vec::new();
    for _ in 0..4 {
        let t = work(&a, &b);
        assert_ne!(ptr(&t), owned, "eager work got the graph's output block");
        kept.push(t);
        drop(work(&a, &b));
    }
    drop(kept);
    let in_graphs = g.pool_stats().bytes_in_graphs;
    assert!(in_graphs > 0);
    drop(graph);
    assert!(g.pool_stats().bytes_in_graphs < in_graphs, "the graph's memory did not come back");
}

/// A small unconditional U-Net for the simulated GPU, every layer perturbed off zero, with its
/// parameters in one arena on the GPU.
fn model(seed: u64) -> UNetModel {
    let mut c = UNetConfig::new([1, 8, 8], 32, 1);
    c.channel_mult = Some(vec![1.0, 2.0]);
    c.attention_resolutions = "4".into();
    let m = UNetModel::new(&c, Init::Torch(seed)).unwrap();
    let mut r = Rng::new(seed + 1);
    let vals: Vec<Tensor> = m.params().vars().iter().map(|v| v.value().add(&Tensor::randn(v.value().shape(), &mut r).mul_scalar(0.02).unwrap()).unwrap()).collect();
    m.params().set_all(vals);
    let mut m = m;
    m.to_device(DEV).unwrap();
    m.params().flatten().unwrap();
    m
}

fn identity(m: &UNetModel) -> Vec<(u64, usize, usize)> {
    m.params().device_identity().expect("on the GPU")
}

/// Solve with the graph path and eagerly from the same x0; both results' bits.
fn both(m: &UNetModel, solver: &OdeSolver, steps: usize, x0: &Tensor) -> (Vec<u32>, Vec<u32>) {
    let n = x0.shape()[0];
    let mut f = |t: f32, x: &Tensor| m.predict(&Tensor::full_on(&[n], t, DType::F32, x.device())?, x, None);
    let (yg, sg) = odeint_graphed(&mut f, x0, 0.0, 1.0, steps, solver, identity(m)).unwrap();
    let (ye, se) = odeint(&mut f, x0, 0.0, 1.0, steps, solver).unwrap();
    assert_eq!(sg, se, "{}: the solve's statistics", solver.name());
    assert!(yg.device().is_cuda());
    (bits(&yg), bits(&ye))
}

#[test]
fn sampler_replays_are_bitwise_the_eager_solves_for_every_fixed_grid_solver() {
    let Some((_g, _one)) = gpu("sampler") else { return };
    let m = model(11);
    let mut rng = Rng::new(4);
    for solver in [OdeSolver::Euler, OdeSolver::Midpoint, OdeSolver::Rk4] {
        let s0 = sampler_graph_stats();
        let mut last = Vec::new();
        // the warm-up, the capture, two replays: each from a fresh x0
        for solve in 0..4 {
            let x0 = rnd(&[2, 1, 8, 8], &mut rng);
            let (g, e) = both(&m, &solver, 3, &x0);
            assert_eq!(g, e, "{} solve {solve}: the graph path differs from the eager solve", solver.name());
            assert_ne!(g, last, "{} solve {solve}: the same result for a new x0", solver.name());
            last = g;
        }
        let s = sampler_graph_stats();
        assert_eq!((s.captures - s0.captures, s.replays - s0.replays, s.refused - s0.refused), (1, 2, 0), "{}: {s:?}", solver.name());
        eprintln!("{}: 1 warm-up, 1 capture, 2 replays, bitwise the eager solves", solver.name());
    }
}

#[test]
fn a_replay_sees_weights_updated_in_place_and_replaced_weights_drop_the_graph() {
    let Some((_g, _one)) = gpu("weights") else { return };
    let m = model(12);
    let mut rng = Rng::new(5);
    let solver = OdeSolver::Midpoint;
    let x0 = rnd(&[2, 1, 8, 8], &mut rng);
    for _ in 0..3 {
        let (g, e) = both(&m, &solver, 2, &x0);
        assert_eq!(g, e);
    }
    let (before, _) = both(&m, &solver, 2, &x0);
    let s0 = sampler_graph_stats();
    // an Adam step writes the arena in place: the same buffers, new values
    let id = identity(&m);
    let grads: Vec<Tensor> = m.params().vars().iter().map(|v| rnd(v.value().shape(), &mut rng)).collect();
    Adam::new(1e-2).step_flat(m.params(), &grads, 1e-2, 1.0, None).unwrap();
    assert_eq!(identity(&m), id, "the update did not happen in place");
    let (g, e) = both(&m, &solver, 2, &x0);
    assert_ne!(g, before, "the update changed nothing");
    assert_eq!(g, e, "the replay did not see the updated weights");
    let s1 = sampler_graph_stats();
    assert_eq!((s1.replays - s0.replays, s1.invalidated - s0.invalidated), (1, 0), "{s1:?}");
    // replaced weights (as the trainer's policy refresh does): the graph is dropped, not replayed
    let other = model(13);
    m.params().set_all(other.params().vars().iter().map(|v| v.value()).collect());
    let (g, e) = both(&m, &solver, 2, &x0);
    assert_eq!(g, e, "after replacing the weights");
    let s2 = sampler_graph_stats();
    assert_eq!((s2.replays - s1.replays, s2.invalidated - s1.invalidated), (0, 1), "{s2:?}");
    for _ in 0..2 {
        let (g, e) = both(&m, &solver, 2, &x0);
        assert_eq!(g, e);
    }
    assert_eq!(sampler_graph_stats().replays - s2.replays, 1, "no new graph for the new weights");
}

#[test]
fn a_refused_sampler_capture_falls_back_to_eager_solves() {
    let Some((g, _one)) = gpu("fallback") else { return };
    let m = model(14);
    let mut rng = Rng::new(6);
    let solver = OdeSolver::Euler;
    let s0 = sampler_graph_stats();
    for _ in 0..4 {
        let x0 = rnd(&[2, 1, 8, 8], &mut rng);
        // a field that uploads a value at every evaluation (as a class-conditional model's
        // labels are): not capturable
        let mut f = |t: f32, x: &Tensor| m.predict(&Tensor::from_vec(vec![t; 2], &[2]).to_device(x.device())?, x, None);
        let (yg, _) = odeint_graphed(&mut f, &x0, 0.0, 1.0, 2, &solver, identity(&m)).unwrap();
        let (ye, _) = odeint(&mut f, &x0, 0.0, 1.0, 2, &solver).unwrap();
        assert_eq!(bits(&yg), bits(&ye));
    }
    let s = sampler_graph_stats();
    assert_eq!((s.captures - s0.captures, s.replays - s0.replays, s.refused - s0.refused), (0, 0, 1), "{s:?}");
    assert!(!g.is_capturing());
}

#[test]
fn the_trainer_with_graphs_samples_and_trains_bitwise_as_without() {
    let Some((_g, _one)) = gpu("trainer") else { return };
    let cfg = OrwConfig { learning_rate: 1e-3, warmup_steps: 0, batch_size: 2, steps_per_epoch: 3, num_epochs: 2, ode_steps: 2, temperature: 2.0, w2_coefficient: 0.3, seed: 7, ..OrwConfig::default() };
    let init = model(15);
    let run = |graphs: bool| {
        set_graphs_enabled(Some(graphs));
        clear_sampler_graphs();
        let mut m = init.clone();
        m.to_device(DEV).unwrap();
        let mut t = Trainer::new(cfg.clone(), m).unwrap();
        t.to_device(DEV).unwrap();
        let mean = |x: &Tensor| -> Vec<f32> { x.data().chunks(64).map(|r| r.iter().sum::<f32>() / 64.0).collect() };
        let losses: Vec<u32> = (0..6).map(|_| t.train_step(&mut FnReward::new("mean", mean)).unwrap().total_loss.to_bits()).collect();
        let params: Vec<Vec<u32>> = t.net().params().vars().iter().map(|v| bits(&v.value())).collect();
        set_graphs_enabled(None);
        (losses, params)
    };
    let (s0, t0) = (sampler_graph_stats(), step_graph_stats());
    let with = run(true);
    let (s1, t1) = (sampler_graph_stats(), step_graph_stats());
    let without = run(false);
    let (s2, t2) = (sampler_graph_stats(), step_graph_stats());
    // the training step's pass: the first Adam step copies the weights (the policy shares them:
    // copy on write), so the slot warms up again at step 1; captured at step 2, replayed at
    // steps 2 and 3; the first update after the refresh copies them again: warm-up at step 4,
    // captured and replayed at step 5
    assert_eq!((t1.captures - t0.captures, t1.replays - t0.replays, t1.invalidated - t0.invalidated, t1.refused - t0.refused), (2, 3, 1, 0), "{t1:?}");
    assert_eq!(t2, t1, "step graphs were used with graphs off");
    // 6 steps, 2 rounds of 3 solves: per round a warm-up, a capture and a replay; the refresh
    // drops the first round's graph
    assert_eq!((s1.captures - s0.captures, s1.replays - s0.replays, s1.invalidated - s0.invalidated), (2, 2, 1), "{s1:?}");
    assert_eq!(s2, s1, "graphs were used with graphs off");
    assert_eq!(with.0, without.0, "the losses differ");
    assert!(with.1 == without.1, "the trained weights differ");
}

#[test]
fn a_model_with_dropout_trains_without_a_step_graph() {
    let Some((_g, _one)) = gpu("dropout") else { return };
    let cfg = OrwConfig { learning_rate: 1e-3, warmup_steps: 0, batch_size: 2, steps_per_epoch: 3, num_epochs: 1, ode_steps: 1, seed: 8, dropout: true, ..OrwConfig::default() };
    let mut c = UNetConfig::new([1, 8, 8], 32, 1);
    c.channel_mult = Some(vec![1.0, 2.0]);
    c.attention_resolutions = "4".into();
    c.dropout = 0.1;
    let mut m = UNetModel::new(&c, Init::Torch(16)).unwrap();
    m.to_device(DEV).unwrap();
    let mut t = Trainer::new(cfg, m).unwrap();
    let t0 = step_graph_stats();
    let mean = |x: &Tensor| -> Vec<f32> { x.data().chunks(64).map(|r| r.iter().sum::<f32>() / 64.0).collect() };
    for _ in 0..3 {
        assert!(t.train_step(&mut FnReward::new("mean", mean)).unwrap().total_loss.is_finite());
    }
    let t1 = step_graph_stats();
    // the masks' Philox offsets are kernel arguments that move every step: never captured
    assert_eq!((t1.captures - t0.captures, t1.replays - t0.replays, t1.refused - t0.refused), (0, 0, 0), "{t1:?}");
    assert!(t1.eager > t0.eager);
}
