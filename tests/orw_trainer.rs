//! The ORW-CFM-W2 trainer: weights stay with their samples through OT re-pairing, the policy is
//! refreshed once per epoch, warm-up and logging, checkpoints resume bit for bit, a torchcfm `.pt`
//! serves as the reference, and bad rewards or configs stop with a clear message.

mod common;

use std::path::PathBuf;

use orwcfm_fast::flow::matchers::{FlowMatcher, MatcherKind};
use orwcfm_fast::logging::MetricsLog;
use orwcfm_fast::nn::{Init, Mlp, MlpConfig, UNetConfig, UNetModel, VelocityField};
use orwcfm_fast::orw::{OnStep, OrwConfig, RunEnd, StepMetrics, TrainHooks, Trainer, pair_batch};
use orwcfm_fast::reward::FnReward;
use orwcfm_fast::rng::Rng;
use orwcfm_fast::rng::philox::Philox;
use orwcfm_fast::tensor::{Device, Tensor};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("orwcfm-trainer-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mlp() -> Mlp {
    Mlp::new(MlpConfig { dim: 2, width: 32, hidden_layers: 2 }, 7).unwrap()
}

fn base_cfg() -> OrwConfig {
    OrwConfig { learning_rate: 1e-2, warmup_steps: 2, batch_size: 16, steps_per_epoch: 4, num_epochs: 3, ode_steps: 4, temperature: 1.0, w2_coefficient: 0.5, seed: 3, ..OrwConfig::default() }
}

/// Reward of a 2-D sample: its first coordinate.
fn first_coord(x: &Tensor) -> Vec<f32> {
    x.data().chunks(2).map(|r| r[0]).collect()
}

fn values<M: VelocityField>(m: &M) -> Vec<Vec<f32>> {
    m.params().vars().iter().map(|v| v.value().to_vec()).collect()
}

#[test]
fn weights_follow_their_samples_through_ot_pairing() {
    let mut rng = Rng::new(11);
    let b = 24;
    let x1 = Tensor::randn(&[b, 2], &mut rng);
    let w: Vec<f32> = first_coord(&x1).iter().map(|r| (0.7 * r).exp()).collect();
    let y: Vec<usize> = (0..b).collect();
    for (kind, replace) in [(MatcherKind::ExactOt, false), (MatcherKind::ExactOt, true), (MatcherKind::SchrodingerBridge, true), (MatcherKind::Independent, false)] {
        let mut m = FlowMatcher::new(kind, 0.0);
        m.ot_replace = replace;
        let p = pair_batch(&m, &x1, &w, Some(&y), Device::Cpu, &mut rng, &mut Philox::new(12), &mut Philox::new(13)).unwrap();
        let x0 = &p.x0;
        let (xt, ut, t) = (p.flow.xt.data(), p.flow.ut.data(), p.flow.t.data());
        let mut moved = false;
        for k in 0..b {
            let (i, j) = (p.flow.x0_idx[k], p.flow.x1_idx[k]);
            moved |= j != k || i != k;
            // the row was built from x0[i] and x1[j] ...
            if kind != MatcherKind::SchrodingerBridge {
                for d in 0..2 {
                    let want = x1.data()[2 * j + d] - x0.data()[2 * i + d];
                    assert!((ut[2 * k + d] - want).abs() < 1e-6, "{kind:?}: u_t row {k} is not x1[{j}] - x0[{i}]");
                    let want_xt = t[k] * x1.data()[2 * j + d] + (1.0 - t[k]) * x0.data()[2 * i + d];
                    assert!((xt[2 * k + d] - want_xt).abs() < 1e-5);
                }
            }
            // ... and carries x1[j]'s weight and label, recomputed from the sample itself
            assert_eq!(p.w[k], (0.7 * x1.data()[2 * j]).exp(), "{kind:?}: weight of row {k}");
            assert_eq!(p.y.as_ref().unwrap()[k], j);
        }
        if kind.uses_ot() {
            assert!(moved, "{kind:?} must actually re-pair this batch for the test to mean anything");
            if replace {
                // the reference code's pairing: weights left in their original order
                let misaligned = (0..b).filter(|&k| p.w[k] != w[k]).count();
                assert!(misaligned > 0, "resampling must move weights relative to the original order");
            }
        }
    }
}

#[test]
fn policy_refresh_warmup_and_metrics() {
    let d = tmpdir("refresh");
    let mut cfg = base_cfg();
    cfg.num_epochs = 2;
    cfg.sample_reuse = 2;
    cfg.sample_batch = 32;
    let init = mlp();
    let init_vals = values(&init);
    let mut tr = Trainer::new(cfg, init).unwrap();
    tr.set_run_dir(&d).unwrap();
    let mut reward = FnReward::new("x", first_coord);
    let mut log: Vec<StepMetrics> = Vec::new();
    // step 0 runs at lr 0 (torchcfm's warm-up): nothing moves
    let m0 = tr.train_step(&mut reward).unwrap();
    assert_eq!(m0.lr, 0.0);
    assert_eq!(values(tr.net()), init_vals);
    assert_eq!(m0.sampled, 32, "the first step draws one solve of sample_batch samples");
    log.push(m0);
    for _ in 0..2 {
        log.push(tr.train_step(&mut reward).unwrap());
        assert_eq!(values(tr.last_policy()), init_vals, "the policy is frozen within an epoch");
        assert_ne!(values(tr.net()), init_vals);
    }
    let m3 = tr.train_step(&mut reward).unwrap();
    assert!(m3.policy_refreshed && tr.epoch() == 1);
    assert_eq!(values(tr.last_policy()), values(tr.net()), "refreshed from net after the epoch");
    log.push(m3);
    assert_eq!(log.iter().map(|m| m.lr).collect::<Vec<_>>(), vec![0.0, 5e-3, 1e-2, 1e-2]);
    // sample reuse 2 and 32 samples per solve with batch 16: a solve every 4 steps, a new batch every 2
    assert_eq!(log.iter().map(|m| m.sampled).collect::<Vec<_>>(), vec![32, 0, 0, 0]);
    assert_eq!(log[0].reward_mean, log[1].reward_mean, "steps 0 and 1 share a batch");
    assert_ne!(log[1].reward_mean, log[2].reward_mean);
    for m in &log {
        assert!(m.reward_min <= m.reward_mean && m.reward_mean <= m.reward_max);
        assert!(m.weight_max >= m.weight_mean && m.weight_ess > 1.0 && m.weight_ess <= 16.0);
        assert!((m.total_loss - (m.fm_loss + 0.5 * m.w2_loss)).abs() < 1e-5 * m.total_loss.abs().max(1.0));
        assert!(m.grad_norm > 0.0);
    }
    // run() finishes the second epoch, its metrics log hook logs every step, and it checkpoints at the end
    let end = tr.run(&mut reward, None, &mut MetricsLog::create(&d, None).unwrap()).unwrap();
    assert_eq!(tr.step(), 8);
    assert_eq!(end, RunEnd { stopped: false, checkpoint: Some(d.join("checkpoints/step-00000008")) });
    let lines = std::fs::read_to_string(d.join("metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = lines.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4, "run() logs the 4 steps it ran");
    for k in ["fm_loss", "w2_loss", "total_loss", "reward_mean", "reward_max", "reward_min", "weight_mean", "weight_max", "grad_norm", "lr"] {
        assert!(rows[0][k].is_number(), "metrics.jsonl lacks {k}");
    }
    assert!(d.join("checkpoints/step-00000008/net.safetensors").is_file());
    assert!(d.join("reference.safetensors").is_file());
}

/// `n` steps straight vs `k` steps, checkpoint, resume in a fresh trainer, `n - k` steps.
fn resume_matches<M: VelocityField>(name: &str, model: M, cfg: OrwConfig, n: u64, k: u64, reward: fn(&Tensor) -> Vec<f32>) {
    let d1 = tmpdir(&format!("{name}-straight"));
    let mut a = Trainer::new(cfg.clone(), model.clone()).unwrap();
    a.set_run_dir(&d1).unwrap();
    let mut ra = FnReward::new("r", reward);
    let mut la = Vec::new();
    a.run(&mut ra, Some(n), &mut (MetricsLog::create(&d1, None).unwrap(), OnStep(|m: &StepMetrics| la.push(m.clone())))).unwrap();

    let d2 = tmpdir(&format!("{name}-split"));
    let mut b = Trainer::new(cfg, model).unwrap();
    b.set_run_dir(&d2).unwrap();
    let mut rb = FnReward::new("r", reward);
    let mut lb = Vec::new();
    b.run(&mut rb, Some(k), &mut (MetricsLog::create(&d2, None).unwrap(), OnStep(|m: &StepMetrics| lb.push(m.clone())))).unwrap();
    drop(b);
    let mut c: Trainer<M> = Trainer::resume(&d2).unwrap();
    assert_eq!(c.step(), k);
    c.run(&mut rb, Some(n - k), &mut (MetricsLog::create(&d2, Some(k)).unwrap(), OnStep(|m: &StepMetrics| lb.push(m.clone())))).unwrap();

    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(
            (x.fm_loss.to_bits(), x.w2_loss.to_bits(), x.reward_mean.to_bits(), x.grad_norm.to_bits()),
            (y.fm_loss.to_bits(), y.w2_loss.to_bits(), y.reward_mean.to_bits(), y.grad_norm.to_bits()),
            "{name}: step {} differs after resuming",
            x.step
        );
    }
    assert_eq!(values(a.net()), values(c.net()), "{name}: net");
    assert_eq!(values(a.last_policy()), values(c.last_policy()), "{name}: last_policy");
    assert_eq!(a.ema().map(values), c.ema().map(values), "{name}: ema");
    let moments = |t: &Trainer<M>| t.optimizer().exp_avg.iter().chain(&t.optimizer().exp_avg_sq).map(|m| m.to_vec()).collect::<Vec<_>>();
    assert_eq!(moments(&a), moments(&c), "{name}: Adam moments");
    // the log of the resumed run equals the straight one line for line (timings aside)
    let strip = |p: PathBuf| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("seconds");
                v
            })
            .collect()
    };
    assert_eq!(strip(d1.join("metrics.jsonl")), strip(d2.join("metrics.jsonl")));
}

/// A hook that records what the loop calls it with, and asks to stop at `stop_at`.
#[derive(Default)]
struct Recorder {
    steps: Vec<u64>,
    epochs: Vec<(u64, u64)>,
    checkpoints: Vec<(u64, PathBuf)>,
    asked: Vec<u64>,
    stop_at: Option<u64>,
}

impl<M: VelocityField> TrainHooks<M> for Recorder {
    fn on_step(&mut self, tr: &Trainer<M>, m: &StepMetrics) -> anyhow::Result<()> {
        assert_eq!(tr.step(), m.step, "on_step sees the trainer after the step");
        self.steps.push(m.step);
        Ok(())
    }
    fn on_epoch(&mut self, tr: &Trainer<M>, reward: &mut dyn orwcfm_fast::reward::Reward, m: &StepMetrics) -> anyhow::Result<()> {
        assert!(m.policy_refreshed);
        assert_eq!(reward.name(), "x", "the run's reward is lent to on_epoch");
        self.epochs.push((tr.epoch(), m.step));
        Ok(())
    }
    fn on_checkpoint(&mut self, tr: &Trainer<M>, path: &std::path::Path) -> anyhow::Result<()> {
        assert!(path.join("state.json").is_file(), "on_checkpoint comes after the save: {}", path.display());
        self.checkpoints.push((tr.step(), path.to_path_buf()));
        Ok(())
    }
    fn should_stop(&mut self, tr: &Trainer<M>) -> bool {
        self.asked.push(tr.step());
        self.stop_at == Some(tr.step())
    }
}

fn logged_steps(d: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(d.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect()
}

/// The one loop: every step reaches the hooks once, checkpoints follow `save_every_epochs` and the
/// end of each call (never twice for one step), a hook can stop the run (which saves), and the
/// metrics log holds one line per step across a stop, a resume and a step limit.
#[test]
fn the_loop_calls_its_hooks_once_per_step_and_checkpoints_on_schedule() {
    let d = tmpdir("hooks");
    let mut cfg = base_cfg();
    cfg.num_epochs = 6; // epochs of 4 steps: 24 steps
    cfg.save_every_epochs = 2;
    cfg.keep_checkpoints = 100;
    let mut reward = FnReward::new("x", first_coord);
    let ck = |s: u64| d.join(format!("checkpoints/step-{s:08}"));

    // a step limit mid-epoch: checkpoints after epoch 2 (step 8) and at the limit (step 10)
    let mut tr = Trainer::new(cfg.clone(), mlp()).unwrap();
    tr.set_run_dir(&d).unwrap();
    let mut rec = Recorder::default();
    let end = tr.run(&mut reward, Some(10), &mut (MetricsLog::create(&d, None).unwrap(), &mut rec)).unwrap();
    assert_eq!(end, RunEnd { stopped: false, checkpoint: Some(ck(10)) });
    assert_eq!(rec.steps, (1..=10).collect::<Vec<_>>());
    assert_eq!(rec.asked, rec.steps, "should_stop is asked after every step");
    assert_eq!(rec.epochs, vec![(1, 4), (2, 8)]);
    assert_eq!(rec.checkpoints, vec![(8, ck(8)), (10, ck(10))]);
    drop(tr);

    // resumed, and stopped by a hook right after the scheduled save of epoch 4: saved once
    let mut tr: Trainer<Mlp> = Trainer::resume(&d).unwrap();
    let mut rec = Recorder { stop_at: Some(16), ..Recorder::default() };
    let end = tr.run(&mut reward, None, &mut (MetricsLog::create(&d, Some(10)).unwrap(), &mut rec)).unwrap();
    assert_eq!(end, RunEnd { stopped: true, checkpoint: Some(ck(16)) });
    assert_eq!(rec.steps, (11..=16).collect::<Vec<_>>());
    assert_eq!(rec.epochs, vec![(3, 12), (4, 16)]);
    assert_eq!(rec.checkpoints, vec![(16, ck(16))]);
    drop(tr);

    // resumed from the stop to the end: epoch 6 is on the schedule and the end, one save
    let mut tr: Trainer<Mlp> = Trainer::resume(&d).unwrap();
    let mut rec = Recorder::default();
    let end = tr.run(&mut reward, None, &mut (MetricsLog::create(&d, Some(16)).unwrap(), &mut rec)).unwrap();
    assert_eq!(end, RunEnd { stopped: false, checkpoint: Some(ck(24)) });
    assert_eq!(rec.steps, (17..=24).collect::<Vec<_>>());
    assert_eq!(rec.epochs, vec![(5, 20), (6, 24)]);
    assert_eq!(rec.checkpoints, vec![(24, ck(24))]);
    assert!(tr.finished());
    let mut names: Vec<String> = std::fs::read_dir(d.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("step-")).collect();
    names.sort();
    assert_eq!(names, ["step-00000008", "step-00000010", "step-00000016", "step-00000024"]);
    assert_eq!(logged_steps(&d), (1..=24).collect::<Vec<_>>(), "metrics.jsonl: one line per step");

    // a second resume from an older checkpoint drops the later lines and logs them once again
    let mut tr: Trainer<Mlp> = Trainer::resume(&ck(10)).unwrap();
    tr.run(&mut reward, Some(3), &mut MetricsLog::create(&d, Some(10)).unwrap()).unwrap();
    assert_eq!(logged_steps(&d), (1..=13).collect::<Vec<_>>());
    // without a run folder nothing is saved
    let mut tr = Trainer::new(cfg, mlp()).unwrap();
    let mut rec = Recorder::default();
    assert_eq!(tr.run(&mut reward, Some(8), &mut rec).unwrap(), RunEnd { stopped: false, checkpoint: None });
    assert!(rec.checkpoints.is_empty() && rec.steps.len() == 8);
}

#[test]
fn resume_is_bit_identical_mlp() {
    let mut cfg = base_cfg();
    cfg.sample_reuse = 3;
    cfg.sample_batch = 40;
    cfg.ema_decay = 0.9;
    cfg.coupling = "exact-ot".into();
    cfg.ot_replace = true;
    cfg.ode_solver = "midpoint".into();
    // 10 steps over epochs of 4: the split at 5 falls mid-epoch, mid-batch and with samples pooled
    resume_matches("mlp", mlp(), cfg, 10, 5, first_coord);
}

#[test]
fn resume_is_bit_identical_unet() {
    let ucfg = UNetConfig::from_json_str(r#"{"dim":[1,8,8],"num_channels":32,"num_res_blocks":1,"channel_mult":[1,2],"attention_resolutions":"4","dropout":0.1}"#).unwrap();
    let model = UNetModel::new(&ucfg, Init::Torch(5)).unwrap();
    let mut cfg = base_cfg();
    cfg.batch_size = 4;
    cfg.steps_per_epoch = 3;
    cfg.ode_steps = 3;
    cfg.sample_reuse = 2;
    cfg.weight_mode = "exp-normalized".into();
    let mean_pixel = |x: &Tensor| x.data().chunks(64).map(|r| r.iter().sum::<f32>() / 64.0).collect();
    resume_matches("unet", model, cfg, 6, 4, mean_pixel);
}

#[test]
fn torchcfm_checkpoint_as_reference() {
    let ckpt = common::fixture_path("tiny_ckpt.pt");
    let d = tmpdir("ptref");
    let cfg = OrwConfig {
        ref_path: Some(ckpt.to_str().unwrap().into()),
        ref_key: Some("net_model".into()),
        batch_size: 2,
        steps_per_epoch: 2,
        num_epochs: 1,
        ode_steps: 2,
        dropout: false,
        warmup_steps: 0,
        coupling: "independent".into(),
        ..OrwConfig::default()
    };
    let mut tr: Trainer<UNetModel> = Trainer::from_ref_path(cfg).unwrap();
    let want = orwcfm_fast::io::model::read_weights(&ckpt, Some("net_model")).unwrap().tensors;
    for ((n, v), (wn, wv)) in tr.reference().params().iter().zip(&want) {
        assert_eq!(n, wn);
        assert_eq!(v.value().to_vec(), wv.to_vec(), "reference {n} differs from the checkpoint's net_model");
    }
    tr.set_run_dir(&d).unwrap();
    let mut reward = FnReward::new("mean", |x: &Tensor| x.data().chunks(1024).map(|r| r.iter().sum::<f32>()).collect());
    let mut log = Vec::new();
    tr.run(&mut reward, Some(1), &mut OnStep(|m: &StepMetrics| log.push(m.clone()))).unwrap();
    // before its first update net equals the reference (dropout off): the W2 term is rounding
    // alone (the tape's forward runs flash attention, the reference's inference forward the
    // probability-forming kernel: they agree to ~1e-7 per element)
    assert!(log[0].w2_loss < 1e-10, "w2 {} before the first update", log[0].w2_loss);
    // resume with the reference taken from ref_path when the run folder lacks its copy
    std::fs::remove_file(d.join("reference.safetensors")).unwrap();
    let mut tr2: Trainer<UNetModel> = Trainer::resume(&d).unwrap();
    tr2.run(&mut reward, None, &mut OnStep(|m: &StepMetrics| log.push(m.clone()))).unwrap();
    assert!(log[1].w2_loss > 1e3 * log[0].w2_loss.max(1e-12), "after one update net has moved away from the reference: w2 {} then {}", log[0].w2_loss, log[1].w2_loss);
}

#[test]
fn bad_rewards_and_configs_stop_with_a_message() {
    let cfg = base_cfg();
    let err = |r: &mut dyn orwcfm_fast::reward::Reward| {
        let mut tr = Trainer::new(cfg.clone(), mlp()).unwrap();
        format!("{:#}", tr.train_step(r).expect_err("must fail"))
    };
    let e = err(&mut FnReward::new("nan", |x: &Tensor| {
        let mut v = first_coord(x);
        v[3] = f32::NAN;
        v
    }));
    assert!(e.contains("non-finite") && e.contains("sample 3"), "{e}");
    let e = err(&mut FnReward::new("short", |x: &Tensor| first_coord(x)[1..].to_vec()));
    assert!(e.contains("15 values for a batch of 16"), "{e}");
    let e = err(&mut FnReward::new("huge", |x: &Tensor| first_coord(x).iter().map(|v| v * 1e4).collect()));
    assert!(e.contains("not finite") && e.contains("temperature"), "{e}");

    let e = OrwConfig::from_json_str(r#"{"temprature": 2.0}"#).unwrap_err().to_string();
    assert!(e.contains("did you mean 'temperature'"), "{e}");
    let e = OrwConfig::from_json_str(r#"{"coupling": "sinkhorn"}"#).unwrap_err();
    assert!(format!("{e:#}").contains("unknown flow matcher 'sinkhorn'"), "{e:#}");
    let e = OrwConfig::from_json_str(r#"{"batch_size": 0}"#).unwrap_err().to_string();
    assert!(e.contains("batch_size must be at least 1"), "{e}");
    let c = OrwConfig::from_json_str(r#"{"learning_rate": 1e-3, "w2_coefficient": 0.3, "weight_mode": "zscore"}"#).unwrap();
    assert_eq!((c.learning_rate, c.w2_coefficient, c.temperature), (1e-3, 0.3, 0.5));
    assert_eq!(OrwConfig::from_json_value(c.to_json()).unwrap(), c);

    let e = format!("{:#}", Trainer::<Mlp>::resume(&tmpdir("nothing")).err().unwrap());
    assert!(e.contains("neither a run folder"), "{e}");
}

#[test]
fn a_failed_checkpoint_save_keeps_the_previous_one() {
    let d = tmpdir("failsave");
    let mut tr = Trainer::new(base_cfg(), mlp()).unwrap();
    tr.set_run_dir(&d).unwrap();
    let mut reward = FnReward::new("x", first_coord);
    tr.run(&mut reward, Some(2), &mut ()).unwrap(); // saves step 2
    tr.train_step(&mut reward).unwrap();
    // the save at step 3 fails half-way (injected, for this run folder only)
    unsafe { std::env::set_var("ORWCFM_FAIL_CHECKPOINT", &d) };
    let err = tr.save_checkpoint().unwrap_err();
    unsafe { std::env::remove_var("ORWCFM_FAIL_CHECKPOINT") };
    assert!(format!("{err:#}").contains("previous checkpoint is kept"), "{err:#}");
    assert_eq!(std::fs::read_to_string(d.join("checkpoints/latest")).unwrap().trim(), "step-00000002");
    let names: Vec<String> = std::fs::read_dir(d.join("checkpoints")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!names.iter().any(|n| n.starts_with(".tmp")), "the half-written folder is removed: {names:?}");
    assert!(!names.iter().any(|n| n == "step-00000003"), "{names:?}");
    let back: Trainer<Mlp> = Trainer::resume(&d).unwrap();
    assert_eq!(back.step(), 2);
    // and the next save works again
    tr.save_checkpoint().unwrap();
    assert_eq!(std::fs::read_to_string(d.join("checkpoints/latest")).unwrap().trim(), "step-00000003");
}

/// The Philox noise streams: keyed by the run's seed (another seed, other noise), saved in
/// `state.json` with their offsets, and a checkpoint of the xoshiro era (format 1) or one that
/// lacks them is refused with a message that says why.
#[test]
fn noise_streams_are_seeded_checkpointed_and_old_checkpoints_refused() {
    let mut reward = FnReward::new("x", first_coord);
    let loss_of = |seed: u64| {
        let mut tr = Trainer::new(OrwConfig { seed, ..base_cfg() }, mlp()).unwrap();
        tr.train_step(&mut FnReward::new("x", first_coord)).unwrap().fm_loss
    };
    assert_eq!(loss_of(3).to_bits(), loss_of(3).to_bits(), "one seed, one run");
    assert_ne!(loss_of(3), loss_of(4), "another seed draws other noise");

    let d = tmpdir("philox-state");
    let mut tr = Trainer::new(base_cfg(), mlp()).unwrap();
    tr.set_run_dir(&d).unwrap();
    tr.run(&mut reward, Some(2), &mut ()).unwrap();
    let sp = d.join("checkpoints/step-00000002/state.json");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&sp).unwrap()).unwrap();
    assert_eq!(state["format"], "orwcfm-fast/orw-checkpoint/2");
    let ph = &state["philox"];
    let seeds: Vec<u64> = ["sample", "x0", "eps", "dropout"].iter().map(|k| ph[k]["seed"].as_u64().unwrap_or_else(|| panic!("philox.{k}.seed in {ph}"))).collect();
    assert!(seeds.windows(2).all(|w| w[0] != w[1]), "each stream has its own key: {seeds:?}");
    // the x0 and ε streams drew one batch of 16 × 2 values per step (8 blocks each)
    assert_eq!((ph["x0"]["offset"].as_u64(), ph["eps"]["offset"].as_u64()), (Some(16), Some(16)), "{ph}");
    assert!(ph["sample"]["offset"].as_u64().unwrap() > 0);

    let mut old = state.clone();
    old["format"] = "orwcfm-fast/orw-checkpoint/1".into();
    std::fs::write(&sp, serde_json::to_string(&old).unwrap()).unwrap();
    let e = format!("{:#}", Trainer::<Mlp>::resume(&d).err().unwrap());
    assert!(e.contains("xoshiro") && e.contains("cannot continue") && e.contains("net.safetensors"), "{e}");
    let mut lacking = state.clone();
    lacking.as_object_mut().unwrap().remove("philox");
    std::fs::write(&sp, serde_json::to_string(&lacking).unwrap()).unwrap();
    let e = format!("{:#}", Trainer::<Mlp>::resume(&d).err().unwrap());
    assert!(e.contains("'philox'"), "{e}");
    std::fs::write(&sp, serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(Trainer::<Mlp>::resume(&d).unwrap().step(), 2);
}
