//! torchcfm's `UNetModelWrapper` (guided-diffusion U-Net, `forward(t, x, y)`), parameter for parameter.

use anyhow::{Result, bail};

use super::config::UNetConfig;
use super::params::ParamStore;
use crate::autograd::Var;
use crate::autograd::fused::{self, Act};
use crate::autograd::ops::{self, *};
use crate::backend::cpu::attention::QkvOrder;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

const GN_GROUPS: usize = 32;
const GN_EPS: f32 = 1e-5;

/// How parameters are initialised when a model is built from a config.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// PyTorch's default layer init (uniform ±1/√fan_in), zeros for torchcfm's `zero_module`s.
    Torch(u64),
    /// All zeros (the values are about to be replaced by loaded weights).
    Zeros,
}

struct Builder {
    params: ParamStore,
    init: Init,
    rng: Rng,
}

impl Builder {
    fn uniform(&mut self, name: String, shape: &[usize], fan_in: usize, zero: bool) -> usize {
        let t = match self.init {
            Init::Torch(_) if !zero => {
                let b = 1.0 / (fan_in as f32).sqrt();
                Tensor::rand_uniform(shape, -b, b, &mut self.rng)
            }
            _ => Tensor::zeros(shape),
        };
        self.params.add(name, t)
    }
    fn fill(&mut self, name: String, shape: &[usize], v: f32) -> usize {
        let v = if self.init == Init::Zeros { 0.0 } else { v };
        self.params.add(name, Tensor::full(shape, v))
    }
    fn linear(&mut self, p: &str, i: usize, o: usize) -> Linear {
        Linear { w: self.uniform(format!("{p}.weight"), &[o, i], i, false), b: self.uniform(format!("{p}.bias"), &[o], i, false) }
    }
    fn conv(&mut self, p: &str, ci: usize, co: usize, k: usize, stride: usize, pad: usize, zero: bool) -> Conv {
        let fan = ci * k * k;
        Conv { w: self.uniform(format!("{p}.weight"), &[co, ci, k, k], fan, zero), b: self.uniform(format!("{p}.bias"), &[co], fan, zero), stride, pad, conv1d: false }
    }
    /// `nn.Conv1d(ci, co, 1)`: weight `[co, ci, 1]`.
    fn conv1d(&mut self, p: &str, ci: usize, co: usize, zero: bool) -> Conv {
        Conv { w: self.uniform(format!("{p}.weight"), &[co, ci, 1], ci, zero), b: self.uniform(format!("{p}.bias"), &[co], ci, zero), stride: 1, pad: 0, conv1d: true }
    }
    fn norm(&mut self, p: &str, c: usize) -> Norm {
        Norm { w: self.fill(format!("{p}.weight"), &[c], 1.0), b: self.fill(format!("{p}.bias"), &[c], 0.0) }
    }
}

#[derive(Clone, Debug)]
struct Linear {
    w: usize,
    b: usize,
}
#[derive(Clone, Debug)]
struct Conv {
    w: usize,
    b: usize,
    stride: usize,
    pad: usize,
    conv1d: bool,
}
#[derive(Clone, Debug)]
struct Norm {
    w: usize,
    b: usize,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Resample {
    None,
    Up,
    Down,
}

#[derive(Clone, Debug)]
struct ResBlock {
    in_norm: Norm,
    in_conv: Conv,
    emb: Linear,
    out_norm: Norm,
    out_conv: Conv,
    skip: Option<Conv>,
    resample: Resample,
    scale_shift: bool,
    out_ch: usize,
}

#[derive(Clone, Debug)]
struct Attention {
    norm: Norm,
    qkv: Conv,
    proj: Conv,
    heads: usize,
    order: QkvOrder,
}

#[derive(Clone, Debug)]
enum Layer {
    Conv(Conv),
    Res(ResBlock),
    Attn(Attention),
    /// `Downsample` (conv stride 2, key `.op`)
    Down(Conv),
    /// `Upsample` (nearest 2× then conv, key `.conv`)
    Up(Conv),
}

/// Shape summary of one block, for `info`.
#[derive(Clone, Debug)]
pub struct BlockInfo {
    pub name: String,
    pub kind: String,
    pub channels: usize,
    /// downsample factor relative to the input
    pub ds: usize,
    pub params: usize,
}

/// The U-Net. Cloning is cheap and yields an independent copy of the parameters.
#[derive(Clone)]
pub struct UNetModel {
    config: UNetConfig,
    params: ParamStore,
    time_embed: (Linear, Linear),
    label_emb: Option<usize>,
    input_blocks: Vec<Vec<Layer>>,
    middle: Vec<Layer>,
    output_blocks: Vec<Vec<Layer>>,
    out_norm: Norm,
    out_conv: Conv,
    levels: usize,
    blocks: Vec<BlockInfo>,
}

/// Per-call options of the forward pass.
pub struct Forward<'a> {
    /// `Some(stream)` applies dropout (training mode) with masks drawn from this Philox stream.
    pub dropout_rng: Option<&'a mut crate::rng::philox::Philox>,
}

impl UNetModel {
    /// Build the model from a config; parameter names and order follow torchcfm's `state_dict`.
    pub fn new(config: &UNetConfig, init: Init) -> Result<Self> {
        config.validate()?;
        let seed = if let Init::Torch(s) = init { s } else { 0 };
        let mut b = Builder { params: ParamStore::new(), init, rng: Rng::new(seed) };
        let mc = config.num_channels;
        let ted = 4 * mc;
        let mult = config.channel_mult_resolved()?;
        let attn_ds = config.attention_ds()?;
        let order = if config.use_new_attention_order { QkvOrder::New } else { QkvOrder::Legacy };
        let time_embed = (b.linear("time_embed.0", mc, ted), b.linear("time_embed.2", ted, ted));
        let label_emb = config.class_cond.then(|| {
            let n = config.num_classes;
            let t = match init {
                Init::Torch(_) => Tensor::randn(&[n, ted], &mut b.rng),
                Init::Zeros => Tensor::zeros(&[n, ted]),
            };
            b.params.add("label_emb.weight".into(), t)
        });

        let res = |b: &mut Builder, p: &str, ch: usize, out: usize, rs: Resample| -> ResBlock {
            let in_norm = b.norm(&format!("{p}.in_layers.0"), ch);
            let in_conv = b.conv(&format!("{p}.in_layers.2"), ch, out, 3, 1, 1, false);
            let emb = b.linear(&format!("{p}.emb_layers.1"), ted, if config.use_scale_shift_norm { 2 * out } else { out });
            let out_norm = b.norm(&format!("{p}.out_layers.0"), out);
            let out_conv = b.conv(&format!("{p}.out_layers.3"), out, out, 3, 1, 1, true);
            let skip = (out != ch).then(|| b.conv(&format!("{p}.skip_connection"), ch, out, 1, 1, 0, false));
            ResBlock { in_norm, in_conv, emb, out_norm, out_conv, skip, resample: rs, scale_shift: config.use_scale_shift_norm, out_ch: out }
        };
        let attn = |b: &mut Builder, p: &str, ch: usize, up: bool| -> Result<Attention> {
            let heads = config.heads_for(ch, up)?;
            Ok(Attention { norm: b.norm(&format!("{p}.norm"), ch), qkv: b.conv1d(&format!("{p}.qkv"), ch, 3 * ch, false), proj: b.conv1d(&format!("{p}.proj_out"), ch, ch, true), heads, order })
        };
        let mut blocks = Vec::new();
        let count = |b: &Builder, start: usize| b.params.vars()[start..].iter().map(|v| v.value().numel()).sum::<usize>();

        let mut ch = (mult[0] * mc as f64) as usize;
        let input_ch = ch;
        let mut input_blocks = Vec::new();
        let st = b.params.len();
        input_blocks.push(vec![Layer::Conv(b.conv("input_blocks.0.0", config.in_channels(), ch, 3, 1, 1, false))]);
        blocks.push(BlockInfo { name: "input_blocks.0".into(), kind: "conv".into(), channels: ch, ds: 1, params: count(&b, st) });
        let mut chans = vec![ch];
        let mut ds = 1usize;
        for (level, &m) in mult.iter().enumerate() {
            for _ in 0..config.num_res_blocks {
                let p = format!("input_blocks.{}", input_blocks.len());
                let st = b.params.len();
                let out = (m * mc as f64) as usize;
                let mut layers = vec![Layer::Res(res(&mut b, &format!("{p}.0"), ch, out, Resample::None))];
                ch = out;
                let mut kind = "res".to_string();
                if attn_ds.contains(&ds) {
                    layers.push(Layer::Attn(attn(&mut b, &format!("{p}.1"), ch, false)?));
                    kind.push_str("+attn");
                }
                blocks.push(BlockInfo { name: p, kind, channels: ch, ds, params: count(&b, st) });
                input_blocks.push(layers);
                chans.push(ch);
            }
            if level != mult.len() - 1 {
                let p = format!("input_blocks.{}.0", input_blocks.len());
                let st = b.params.len();
                let layer = if config.resblock_updown { Layer::Res(res(&mut b, &p, ch, ch, Resample::Down)) } else { Layer::Down(b.conv(&format!("{p}.op"), ch, ch, 3, 2, 1, false)) };
                input_blocks.push(vec![layer]);
                chans.push(ch);
                ds *= 2;
                blocks.push(BlockInfo { name: p[..p.len() - 2].to_string(), kind: if config.resblock_updown { "res-down" } else { "down" }.into(), channels: ch, ds, params: count(&b, st) });
            }
        }
        let st = b.params.len();
        let middle = vec![Layer::Res(res(&mut b, "middle_block.0", ch, ch, Resample::None)), Layer::Attn(attn(&mut b, "middle_block.1", ch, false)?), Layer::Res(res(&mut b, "middle_block.2", ch, ch, Resample::None))];
        blocks.push(BlockInfo { name: "middle_block".into(), kind: "res+attn+res".into(), channels: ch, ds, params: count(&b, st) });
        let mut output_blocks = Vec::new();
        for (level, &m) in mult.iter().enumerate().rev() {
            for i in 0..=config.num_res_blocks {
                let p = format!("output_blocks.{}", output_blocks.len());
                let st = b.params.len();
                let ich = chans.pop().expect("skip channels");
                let out = (m * mc as f64) as usize;
                let mut layers = vec![Layer::Res(res(&mut b, &format!("{p}.0"), ch + ich, out, Resample::None))];
                ch = out;
                let mut kind = "res".to_string();
                if attn_ds.contains(&ds) {
                    layers.push(Layer::Attn(attn(&mut b, &format!("{p}.{}", layers.len()), ch, true)?));
                    kind.push_str("+attn");
                }
                let block_ds = ds;
                if level > 0 && i == config.num_res_blocks {
                    let q = format!("{p}.{}", layers.len());
                    layers.push(if config.resblock_updown { Layer::Res(res(&mut b, &q, ch, ch, Resample::Up)) } else { Layer::Up(b.conv(&format!("{q}.conv"), ch, ch, 3, 1, 1, false)) });
                    kind.push_str(if config.resblock_updown { "+res-up" } else { "+up" });
                    ds /= 2;
                }
                blocks.push(BlockInfo { name: p, kind, channels: ch, ds: block_ds, params: count(&b, st) });
                output_blocks.push(layers);
            }
        }
        let st = b.params.len();
        let out_norm = b.norm("out.0", ch);
        let out_conv = b.conv("out.2", input_ch, config.out_channels(), 3, 1, 1, true);
        blocks.push(BlockInfo { name: "out".into(), kind: "norm+silu+conv".into(), channels: config.out_channels(), ds: 1, params: count(&b, st) });
        Ok(UNetModel { config: config.clone(), params: b.params, time_embed, label_emb, input_blocks, middle, output_blocks, out_norm, out_conv, levels: mult.len(), blocks })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }
    pub fn params(&self) -> &ParamStore {
        &self.params
    }
    pub fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }
    pub fn blocks(&self) -> &[BlockInfo] {
        &self.blocks
    }
    /// Number of resolution levels (`len(channel_mult)`).
    pub fn levels(&self) -> usize {
        self.levels
    }

    fn p(&self, i: usize) -> &Var {
        self.params.var(i)
    }

    fn lin(&self, l: &Linear, x: &Var) -> Result<Var> {
        linear(x, self.p(l.w), Some(self.p(l.b)))
    }
    fn conv(&self, c: &Conv, x: &Var) -> Result<Var> {
        if c.conv1d {
            // [B, C, T] → 1×1 conv on [B, C, T, 1]
            let s = x.shape();
            let w = self.p(c.w);
            let ws = w.shape();
            let y = conv2d(&reshape(x, &[s[0], s[1], s[2], 1])?, &reshape(w, &[ws[0], ws[1], 1, 1])?, Some(self.p(c.b)), 1, 0)?;
            reshape(&y, &[s[0], ws[0], s[2]])
        } else {
            conv2d(x, self.p(c.w), Some(self.p(c.b)), c.stride, c.pad)
        }
    }
    /// `conv(x) + a` (a 2-D convolution; `a` of its output's shape or `[B, C, 1, 1]`) as one node.
    fn conv_add(&self, c: &Conv, x: &Var, a: &Var) -> Result<Var> {
        debug_assert!(!c.conv1d, "conv_add: 2-D convolutions only");
        conv2d_add(x, self.p(c.w), Some(self.p(c.b)), a, c.stride, c.pad)
    }
    fn norm(&self, n: &Norm, x: &Var) -> Result<Var> {
        group_norm(x, self.p(n.w), self.p(n.b), GN_GROUPS, GN_EPS)
    }
    /// `silu(GN(x) · (1 + scale) + shift)` (or `silu(GN(x))`) as one fused node.
    fn norm_silu(&self, n: &Norm, x: &Var, scale_shift: Option<(&Var, &Var)>) -> Result<Var> {
        fused::group_norm_act(x, self.p(n.w), self.p(n.b), scale_shift, GN_GROUPS, GN_EPS, Act::Silu)
    }

    fn resblock(&self, r: &ResBlock, x: &Var, emb_silu: &Var, fw: &mut Forward) -> Result<Var> {
        let mut h = self.norm_silu(&r.in_norm, x, None)?;
        let mut xs = x.clone();
        match r.resample {
            Resample::None => {}
            Resample::Up => {
                h = upsample_nearest2x(&h)?;
                xs = upsample_nearest2x(&xs)?;
            }
            Resample::Down => {
                h = avg_pool2x(&h)?;
                xs = avg_pool2x(&xs)?;
            }
        }
        let e = self.lin(&r.emb, emb_silu)?;
        let b = e.shape()[0];
        h = if r.scale_shift {
            // silu(out_norm(h) · (1 + scale) + shift), scale and shift [B, out_ch]
            let (scale, shift) = (narrow(&e, 1, 0, r.out_ch)?, narrow(&e, 1, r.out_ch, r.out_ch)?);
            self.norm_silu(&r.out_norm, &self.conv(&r.in_conv, &h)?, Some((&scale, &shift)))?
        } else {
            // in_conv(h) + emb[:, :, None, None], the sum taken as the convolution writes
            self.norm_silu(&r.out_norm, &self.conv_add(&r.in_conv, &h, &reshape(&e, &[b, r.out_ch, 1, 1])?)?, None)?
        };
        if let Some(rng) = fw.dropout_rng.as_deref_mut() {
            h = dropout(&h, self.config.dropout as f32, rng)?;
        }
        let skip = match &r.skip {
            Some(c) => self.conv(c, &xs)?,
            None => xs,
        };
        // skip + out_conv(h): the same sum, one node
        self.conv_add(&r.out_conv, &h, &skip)
    }

    fn attention(&self, a: &Attention, x: &Var) -> Result<Var> {
        let s = x.shape();
        let (b, c) = (s[0], s[1]);
        let t: usize = s[2..].iter().product();
        let xf = reshape(x, &[b, c, t])?;
        let qkv = self.conv(&a.qkv, &self.norm(&a.norm, &xf)?)?;
        let h = fused::attention(&qkv, a.heads, a.order)?;
        let h = self.conv(&a.proj, &h)?;
        reshape(&ops::add(&xf, &h)?, &s)
    }

    fn layer(&self, l: &Layer, h: &Var, emb_silu: &Var, fw: &mut Forward) -> Result<Var> {
        match l {
            Layer::Conv(c) | Layer::Down(c) => self.conv(c, h),
            Layer::Up(c) => self.conv(c, &upsample_nearest2x(h)?),
            Layer::Res(r) => self.resblock(r, h, emb_silu, fw),
            Layer::Attn(a) => self.attention(a, h),
        }
    }

    /// Check the inputs of [`forward`](Self::forward) and give `t` the shape `[B]`.
    pub fn check_inputs(&self, t: &Var, x: &Var, y: Option<&[usize]>) -> Result<Var> {
        let xs = x.shape();
        let c = &self.config;
        if xs.len() != 4 {
            bail!("x must have shape [B, C, H, W], got {xs:?}");
        }
        if xs[1] != c.in_channels() {
            bail!("x has {} channels but the model takes {} (x shape {xs:?}, model dim {:?})", xs[1], c.in_channels(), c.dim);
        }
        let f = 1usize << (self.levels - 1);
        if !xs[2].is_multiple_of(f) || !xs[3].is_multiple_of(f) || xs[2] == 0 || xs[3] == 0 {
            bail!("x spatial size {}x{} must be divisible by {f} for a U-Net with {} levels (model dim {:?})", xs[2], xs[3], self.levels, c.dim);
        }
        let b = xs[0];
        // like torchcfm: while t has more than one dimension, keep t[:, 0]
        let mut t = t.clone();
        while t.shape().len() > 1 {
            t = narrow(&t, 1, 0, 1)?;
            let s = t.shape();
            t = reshape(&t, &[&s[..1], &s[2..]].concat())?;
        }
        let t = &t;
        let ts = t.shape();
        let tn: usize = ts.iter().product();
        let t = if tn == 1 && b != 1 {
            // a scalar t (as ODE solvers pass) is repeated over the batch
            {
                let tv = t.value();
                ops::add(&reshape(t, &[1])?, &Var::constant(Tensor::full_on(&[b], 0.0, tv.dtype(), tv.device())?))?
            }
        } else if tn == b && ts.len() <= 1 {
            reshape(t, &[b])?
        } else {
            bail!("t must be a scalar or have shape [{b}] for a batch of {b}, got {ts:?}");
        };
        match (c.class_cond, y) {
            (true, None) => bail!("this model is class-conditional ({} classes): labels y are required", c.num_classes),
            (false, Some(_)) => bail!("labels y were given but this model is not class-conditional"),
            (true, Some(y)) => {
                if y.len() != b {
                    bail!("y has {} labels for a batch of {b}", y.len());
                }
                if let Some(&bad) = y.iter().find(|&&v| v >= c.num_classes) {
                    bail!("label {bad} is out of range for {} classes", c.num_classes);
                }
            }
            _ => {}
        }
        Ok(t)
    }

    /// `v = model(t, x, y)`. `t`: scalar or `[B]`; `x`: `[B, C, H, W]`; `y`: labels when class-conditional.
    pub fn forward(&self, t: &Var, x: &Var, y: Option<&[usize]>, fw: &mut Forward) -> Result<Var> {
        let t = self.check_inputs(t, x, y)?;
        // mixed precision: activations in the parameters' dtype (the sinusoidal embedding is
        // computed in f32 and then cast, as autocast does); the velocity comes back in f32
        let dt = self.params.dtype();
        let x = &ops::to_dtype(x, dt)?;
        let mc = self.config.num_channels;
        let temb = ops::to_dtype(&timestep_embedding(&ops::to_dtype(&t, DType::F32)?, mc)?, dt)?;
        let mut emb = self.lin(&self.time_embed.1, &silu(&self.lin(&self.time_embed.0, &temb)?)?)?;
        if let (Some(le), Some(y)) = (self.label_emb, y) {
            emb = ops::add(&emb, &embedding(self.p(le), y)?)?;
        }
        let emb_silu = silu(&emb)?;
        let mut hs = Vec::with_capacity(self.input_blocks.len());
        let mut h = x.clone();
        for blk in &self.input_blocks {
            for l in blk {
                h = self.layer(l, &h, &emb_silu, fw)?;
            }
            hs.push(h.clone());
        }
        for l in &self.middle {
            h = self.layer(l, &h, &emb_silu, fw)?;
        }
        for blk in &self.output_blocks {
            let skip = hs.pop().expect("skip");
            let (hsh, ssh) = (h.shape(), skip.shape());
            if hsh[2..] != ssh[2..] {
                bail!("feature map {hsh:?} does not match its skip connection {ssh:?}: the input size does not suit this U-Net");
            }
            h = concat(&[h, skip], 1)?;
            for l in blk {
                h = self.layer(l, &h, &emb_silu, fw)?;
            }
        }
        ops::to_dtype(&self.conv(&self.out_conv, &self.norm_silu(&self.out_norm, &h, None)?)?, DType::F32)
    }

    /// Inference: no tape, no dropout.
    pub fn predict(&self, t: &Tensor, x: &Tensor, y: Option<&[usize]>) -> Result<Tensor> {
        crate::autograd::no_grad(|| {
            let v = self.forward(&Var::constant(t.clone()), &Var::constant(x.clone()), y, &mut Forward { dropout_rng: None })?;
            Ok(v.value())
        })
    }
}
