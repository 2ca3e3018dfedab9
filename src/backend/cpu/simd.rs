//! Vectorised transcendental kernels: `exp` (Cephes-style, ≈1 ulp), softmax rows, SiLU and
//! sigmoid. Each loop is written so LLVM vectorises it, and is compiled three times (AVX-512,
//! AVX2+FMA, baseline) and picked by [`super::isa::level`].

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const ROUND_MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting it rounds to an integer

/// `exp(x)` with ≈1 ulp error on [-87, 88]; inputs are clamped to that range (so no inf/NaN from
/// overflow, and ~1e-38 instead of 0 below it).
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND_MAGIC;
    // the low mantissa bits of `shifted` hold round(x·log2 e) as a two's complement integer
    let ni = shifted.to_bits() as i32 - ROUND_MAGIC.to_bits() as i32;
    let n = shifted - ROUND_MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((ni + 127) << 23) as u32)
}

/// A sum with eight independent accumulators (so that it vectorises).
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut s = chunks.remainder().iter().sum::<f32>();
    for a in acc {
        s += a;
    }
    s
}

#[inline(always)]
fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

crate::multiversion! {
    /// In place softmax of one row, `x ← exp(x − max) / Σ`.
    pub fn softmax_inplace(x: &mut [f32]) {
        let m = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        for v in x.iter_mut() {
            *v = exp_f32(*v - m);
        }
        let inv = 1.0 / sum(x);
        for v in x.iter_mut() {
            *v *= inv;
        }
    }
}

crate::multiversion! {
    /// Softmax backward of one row, in place: `g ← y ⊙ (g − Σ g⊙y)`.
    pub fn softmax_backward_inplace(y: &[f32], g: &mut [f32]) {
        let mut acc = [0.0f32; 8];
        let (yc, gc) = (y.chunks_exact(8), g.chunks_exact(8));
        let (yr, gr) = (yc.remainder(), gc.remainder());
        for (a, b) in yc.zip(gc) {
            for i in 0..8 {
                acc[i] += a[i] * b[i];
            }
        }
        let mut dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
        for a in acc {
            dot += a;
        }
        for (o, &p) in g.iter_mut().zip(y) {
            *o = p * (*o - dot);
        }
    }
}

crate::multiversion! {
    /// `y = x · σ(x)`.
    pub fn silu(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * sigmoid_f32(v);
        }
    }
}

crate::multiversion! {
    /// `dx = dy · σ(x)(1 + x(1 − σ(x)))`.
    pub fn silu_backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((o, &v), &g) in dx.iter_mut().zip(x).zip(dy) {
            let s = sigmoid_f32(v);
            *o = g * s * (1.0 + v * (1.0 - s));
        }
    }
}

crate::multiversion! {
    /// `y = x · σ(1.702·x)` (CLIP's QuickGELU).
    pub fn quick_gelu(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * sigmoid_f32(1.702 * v);
        }
    }
}

crate::multiversion! {
    /// `y = σ(x)`.
    pub fn sigmoid(x: &[f32], y: &mut [f32]) {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = sigmoid_f32(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn exp_is_accurate() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst rel err {worst:e}");
        let v: Vec<f32> = [-100.0f32, 0.0, 1.0, 100.0].iter().map(|&x| exp_f32(x)).collect();
        assert!(v[0] < 1e-37 && v[1] == 1.0 && (v[2] - std::f32::consts::E).abs() < 1e-6 && v[3].is_finite());
    }
    #[test]
    fn softmax_sums_to_one() {
        let mut r = crate::rng::Rng::new(3);
        let mut v: Vec<f32> = r.normal_vec(1000).into_iter().map(|x| x * 10.0).collect();
        let want: Vec<f64> = {
            let m = v.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let e: Vec<f64> = v.iter().map(|&x| (x as f64 - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|x| x / s).collect()
        };
        softmax_inplace(&mut v);
        for (a, b) in v.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-6 * b.max(1e-3));
        }
    }
}
