//! Kernel microbenchmarks of the CPU backend: GEMM at the U-Net's conv shapes, conv2d forward and
//! backward, GroupNorm, attention. `cargo bench --bench kernels`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use orwcfm_fast::backend::cpu::attention::{AttnGeom, QkvOrder, qkv_attention_backward, qkv_attention_forward};
use orwcfm_fast::backend::cpu::conv::{ConvGeom, conv2d_backward, conv2d_forward};
use orwcfm_fast::backend::cpu::gemm::{Mat, sgemm};
use orwcfm_fast::backend::cpu::norm::group_norm_forward;
use orwcfm_fast::rng::Rng;

fn gemm(c: &mut Criterion) {
    let mut r = Rng::new(1);
    let mut g = c.benchmark_group("sgemm");
    g.sample_size(10);
    // (m, n, k): CIFAR 3x3 conv at 32x32 and 16x16 per image, its dW and dX products, MNIST 28x28
    for &(m, n, k) in &[(128usize, 1024usize, 1152usize), (256, 256, 2304), (128, 1152, 1024), (1152, 1024, 128), (32, 784, 288)] {
        let a = r.normal_vec(m * k);
        let b = r.normal_vec(k * n);
        let mut out = vec![0.0f32; m * n];
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        for th in [1, 2] {
            g.bench_function(format!("{m}x{n}x{k}_t{th}"), |bch| bch.iter(|| sgemm(m, n, k, Mat::rm(&a, k), Mat::rm(&b, n), &mut out, n, false, 1.0, th)));
        }
    }
    g.finish();
}

fn conv(c: &mut Criterion) {
    let mut r = Rng::new(2);
    let mut g = c.benchmark_group("conv2d");
    g.sample_size(10);
    for &(n, cin, h, cout) in &[(4usize, 128usize, 32usize, 128usize), (4, 256, 16, 256), (32, 32, 28, 32), (32, 64, 14, 64)] {
        let geo = ConvGeom { n, cin, h, w: h, cout, kh: 3, kw: 3, stride: 1, pad: 1 };
        let x = r.normal_vec(n * cin * h * h);
        let w = r.normal_vec(cout * cin * 9);
        let b = r.normal_vec(cout);
        let dy = r.normal_vec(n * cout * h * h);
        g.throughput(Throughput::Elements((2 * n * cout * h * h * cin * 9) as u64));
        g.bench_function(format!("fwd_n{n}_c{cin}_{h}x{h}"), |bch| bch.iter(|| conv2d_forward(&x, &w, Some(&b), &geo)));
        g.bench_function(format!("bwd_n{n}_c{cin}_{h}x{h}"), |bch| bch.iter(|| conv2d_backward(&x, &w, &dy, &geo, true)));
    }
    g.finish();
}

/// Winograd forward with kernels transformed beforehand (as sampling's cached kernels are), each
/// tile on the CIFAR-10 U-Net's 3×3 shapes (batch 4 and 32) and the MNIST one at 14×14.
fn winograd_tiles(c: &mut Criterion) {
    use orwcfm_fast::backend::cpu::winograd::{Tile, conv3x3_for, transform_weights_for};
    let mut r = Rng::new(4);
    let mut g = c.benchmark_group("winograd");
    g.sample_size(10);
    for &(n, cin, h) in &[(4usize, 128usize, 32usize), (4, 256, 16), (32, 128, 32), (32, 256, 16), (32, 64, 14)] {
        let x = r.normal_vec(n * cin * h * h);
        let w = r.normal_vec(cin * cin * 9);
        let b = r.normal_vec(cin);
        g.throughput(Throughput::Elements((2 * n * cin * h * h * cin * 9) as u64));
        for (name, tile) in [("f2", Tile::F2), ("f4", Tile::F4)] {
            let u = transform_weights_for(tile, &w, cin, cin);
            g.bench_function(format!("{name}_n{n}_c{cin}_{h}x{h}"), |bch| bch.iter(|| conv3x3_for(tile, &x, &u, Some(&b), None, n, cin, h, h, cin)));
        }
    }
    g.finish();
}

fn norm_attn(c: &mut Criterion) {
    let mut r = Rng::new(3);
    let mut g = c.benchmark_group("norm_attention");
    g.sample_size(10);
    let (n, ch, s) = (4, 256, 256);
    let x = r.normal_vec(n * ch * s);
    let gamma = r.normal_vec(ch);
    let beta = r.normal_vec(ch);
    g.bench_function("group_norm_4x256x16x16", |b| b.iter(|| group_norm_forward(&x, n, ch, s, 32, 1e-5, &gamma, &beta)));
    // MNIST attention at 28x28: batch 32, 1 head of 32 channels, T = 784
    let geo = AttnGeom { b: 32, heads: 1, ch: 32, t: 784, order: QkvOrder::Legacy };
    let qkv = r.normal_vec(32 * 96 * 784);
    let dout = r.normal_vec(32 * 32 * 784);
    g.bench_function("attention_fwd_b32_t784", |b| b.iter(|| qkv_attention_forward(&qkv, &geo)));
    let (_, probs) = qkv_attention_forward(&qkv, &geo);
    g.bench_function("attention_bwd_b32_t784", |b| b.iter(|| qkv_attention_backward(&qkv, &probs, &dout, &geo)));
    g.finish();
}

criterion_group!(kernels, gemm, conv, winograd_tiles, norm_attn);
criterion_main!(kernels);
