//! Criterion benchmarks of the CPU U-Net: forward (inference) and forward+backward (MSE loss,
//! training mode) for torchcfm's MNIST config at batch 32 and CIFAR-10 config at batch 4.
//! Compare with `scripts/bench_torch_cpu.py` on the same shapes and thread count.

use criterion::{Criterion, criterion_group, criterion_main};
use orwcfm_fast::autograd::{Var, ops};
use orwcfm_fast::nn::{Forward, Init, UNetConfig, UNetModel};
use orwcfm_fast::rng::Rng;
use orwcfm_fast::tensor::Tensor;

fn bench_config(c: &mut Criterion, name: &str, cfg: UNetConfig, batch: usize) {
    let model = UNetModel::new(&cfg, Init::Torch(0)).unwrap();
    let mut rng = Rng::new(1);
    let [ch, h, w] = cfg.dim;
    let x = Tensor::randn(&[batch, ch, h, w], &mut rng);
    let t = Tensor::rand_uniform(&[batch], 0.0, 1.0, &mut rng);
    let target = Tensor::randn(&[batch, cfg.out_channels(), h, w], &mut rng);
    let mut g = c.benchmark_group(format!("unet_{name}_b{batch}"));
    g.sample_size(10);
    g.bench_function("forward", |b| b.iter(|| model.predict(&t, &x, None).unwrap()));
    g.bench_function("forward_backward", |b| {
        b.iter(|| {
            let v = model.forward(&Var::constant(t.clone()), &Var::constant(x.clone()), None, &mut Forward { dropout_rng: Some(&mut rng) }).unwrap();
            let grads = ops::mse_loss(&v, &Var::constant(target.clone())).unwrap().backward().unwrap();
            model.params().grads(&grads).unwrap()
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    bench_config(c, "mnist", UNetConfig::mnist(), 32);
    bench_config(c, "cifar10", UNetConfig::cifar10(), 4);
}

criterion_group!(unet, benches);
criterion_main!(unet);
