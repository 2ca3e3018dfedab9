//! Adam, torchcfm's warm-up, gradient clipping and EMA against PyTorch
//! (scripts/export_optim_fixture.py).

mod common;

use orwcfm_fast::io::safetensors::load;
use orwcfm_fast::optim::{Adam, clip_grad_norm, ema_update, warmup_lr};
use orwcfm_fast::tensor::Tensor;

#[test]
fn adam_warmup_clip_ema_match_pytorch() {
    let f = load(&common::fixture_path("optim_adam.safetensors")).unwrap();
    let meta = |k: &str| f.metadata[k].parse::<f64>().unwrap();
    let (steps, warmup, base_lr, clip, decay) = (meta("steps") as u64, meta("warmup") as u64, meta("base_lr") as f32, meta("clip") as f32, meta("ema_decay") as f32);
    let get = |k: String| f.get(&k).unwrap_or_else(|| panic!("{k}")).clone();
    for (prefix, wd, b1, b2, eps) in [("a.", 0.0, 0.9, 0.999, 1e-8), ("b.", 0.01, 0.8, 0.99, 1e-6)] {
        let mut params: Vec<Tensor> = (0..3).map(|i| get(format!("{prefix}param.{i}"))).collect();
        let mut ema = params.clone();
        let mut adam = Adam { weight_decay: wd, beta1: b1, beta2: b2, eps, ..Adam::new(base_lr) };
        let mut clipped_steps = 0;
        for step in 0..steps {
            let lr = warmup_lr(base_lr, step, warmup);
            let want_lr = get(format!("{prefix}lr.{step}")).item();
            assert!((lr - want_lr).abs() <= 1e-9, "{prefix} step {step}: lr {lr} vs {want_lr}");
            if step == 0 {
                assert_eq!(lr, 0.0, "the first step runs at lr 0");
            }
            let mut grads: Vec<Tensor> = (0..3).map(|i| get(format!("{prefix}grad.{step}.{i}"))).collect();
            let norm = clip_grad_norm(&mut grads, clip).unwrap();
            let want_norm = get(format!("{prefix}norm.{step}")).item() as f64;
            assert!((norm - want_norm).abs() / want_norm < 1e-6, "{prefix} step {step}: norm {norm} vs {want_norm}");
            if norm > clip as f64 {
                clipped_steps += 1;
            }
            adam.step(&mut params, &grads, lr).unwrap();
            ema_update(&mut ema, &params, decay).unwrap();
            for i in 0..3 {
                let e = params[i].rel_err(&get(format!("{prefix}after.{step}.{i}")));
                assert!(e <= 1e-6, "{prefix} step {step} param {i}: {e:e}");
                let e = ema[i].rel_err(&get(format!("{prefix}ema.{step}.{i}")));
                assert!(e <= 1e-6, "{prefix} step {step} ema {i}: {e:e}");
            }
        }
        assert!(clipped_steps > 0 && clipped_steps < steps, "the fixture must exercise clipping on some steps only");
        assert_eq!(adam.step, steps);
    }
}
