//! CLIP (ViT image tower and text transformer) in the Hugging Face layout, inference only, on the
//! engine's tensor ops, so that it runs wherever the tensors live (CPU or CUDA).
//!
//! A model folder holds `config.json` (a `CLIPModel` config: `text_config`, `vision_config`,
//! `projection_dim`), the weights (`model.safetensors`, a sharded `model.safetensors.index.json`
//! or `pytorch_model.bin`), the tokenizer (`tokenizer.json`, or `vocab.json` + `merges.txt`) and
//! optionally `preprocessor_config.json` (or `processor_config.json`'s `image_processor`). Parameters keep the checkpoint's names and are loaded
//! strictly: a missing, unexpected or misshapen key is an error that names it.
//!
//! What the towers compute, as `transformers`' `CLIPModel` does:
//! - image: patches (a `patch×patch` convolution with stride `patch`, no bias) → class token and
//!   position embeddings → `pre_layrnorm` → pre-LN transformer blocks → token 0 →
//!   `post_layernorm` → `visual_projection`;
//! - text: token + position embeddings → causal pre-LN blocks → `final_layer_norm` → the hidden
//!   state at the end token (the first `eos_token_id`; the highest id for legacy configs with
//!   `eos_token_id = 2`) → `text_projection`;
//! - `logits = exp(logit_scale) · cos(image, text)`.
//!
//! The image processor ([`ClipProcessor`]) runs on the model's device too: images in [-1, 1] to
//! [0, 1], PIL's bicubic resize of the short side (two separable passes, each a matrix product,
//! each clamped to [0, 1] as PIL's 8-bit images are), centre crop, CLIP's mean and std.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::clip_tokenizer::ClipTokenizer;
use super::params::ParamStore;
use crate::backend::{QkvOrder, UnaryOp};
use crate::tensor::{DType, Device, Tensor};

/// The activation of a tower's MLP (`hidden_act`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    /// `x·σ(1.702·x)` (OpenAI's CLIP, `quick_gelu`).
    QuickGelu,
    /// Exact GELU (`gelu`, the LAION/OpenCLIP conversions).
    Gelu,
    /// GELU's tanh approximation (`gelu_new`, `gelu_pytorch_tanh`, `gelu_fast`).
    GeluTanh,
}

impl Act {
    fn parse(s: &str) -> Result<Act> {
        Ok(match s {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Act::GeluTanh,
            _ => bail!("unsupported hidden_act {s:?} (quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, gelu_fast)"),
        })
    }
}

/// One tower's transformer.
#[derive(Clone, Debug, PartialEq)]
pub struct TowerConfig {
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub act: Act,
    pub eps: f32,
}

/// A `CLIPModel` config (the fields the forward pass needs, Hugging Face's defaults where absent).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipConfig {
    pub text: TowerConfig,
    pub vision: TowerConfig,
    pub vocab_size: usize,
    pub max_positions: usize,
    pub eos_token_id: i64,
    pub image_size: usize,
    pub patch_size: usize,
    pub channels: usize,
    pub projection_dim: usize,
}

fn get_usize(v: &Value, k: &str, default: usize) -> Result<usize> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(default),
        Some(x) => x.as_u64().map(|n| n as usize).with_context(|| format!("{k} is {x}, not a count")),
    }
}

fn tower(v: &Value, d: (usize, usize, usize, usize)) -> Result<TowerConfig> {
    let act = v.get("hidden_act").and_then(|a| a.as_str()).unwrap_or("quick_gelu");
    let eps = v.get("layer_norm_eps").and_then(|e| e.as_f64()).unwrap_or(1e-5) as f32;
    let t = TowerConfig {
        hidden: get_usize(v, "hidden_size", d.0)?,
        intermediate: get_usize(v, "intermediate_size", d.1)?,
        layers: get_usize(v, "num_hidden_layers", d.2)?,
        heads: get_usize(v, "num_attention_heads", d.3)?,
        act: Act::parse(act)?,
        eps,
    };
    if t.heads == 0 || !t.hidden.is_multiple_of(t.heads) {
        bail!("hidden_size {} is not divisible into {} attention heads", t.hidden, t.heads);
    }
    Ok(t)
}

impl ClipConfig {
    /// From a `config.json` object (`CLIPModel`'s; older files name the towers `*_config_dict`).
    pub fn from_json(v: &Value) -> Result<Self> {
        if let Some(mt) = v.get("model_type").and_then(|m| m.as_str())
            && mt != "clip"
        {
            bail!("model_type is {mt:?}; a CLIP model folder's config.json has \"clip\"");
        }
        let null = Value::Null;
        let pick = |a: &str, b: &str| v.get(a).filter(|x| x.is_object()).or_else(|| v.get(b).filter(|x| x.is_object())).unwrap_or(&null);
        let (tc, vc) = (pick("text_config", "text_config_dict"), pick("vision_config", "vision_config_dict"));
        let c = ClipConfig {
            text: tower(tc, (512, 2048, 12, 8)).context("text_config")?,
            vision: tower(vc, (768, 3072, 12, 12)).context("vision_config")?,
            vocab_size: get_usize(tc, "vocab_size", 49408)?,
            max_positions: get_usize(tc, "max_position_embeddings", 77)?,
            eos_token_id: tc.get("eos_token_id").and_then(|e| e.as_i64()).unwrap_or(49407),
            image_size: get_usize(vc, "image_size", 224)?,
            patch_size: get_usize(vc, "patch_size", 32)?,
            channels: get_usize(vc, "num_channels", 3)?,
            projection_dim: get_usize(v, "projection_dim", 512)?,
        };
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            bail!("vision image_size {} is not a multiple of patch_size {}", c.image_size, c.patch_size);
        }
        Ok(c)
    }

    /// OpenAI's published architectures by name: `vit-b-32`, `vit-b-16`, `vit-l-14`
    /// (`vit-l-14-336`), for benchmarks with random weights.
    pub fn builtin(name: &str) -> Result<Self> {
        let t = |h, f, l, n| TowerConfig { hidden: h, intermediate: f, layers: l, heads: n, act: Act::QuickGelu, eps: 1e-5 };
        let (vision, text, image_size, patch_size, projection_dim) = match name {
            "vit-b-32" => (t(768, 3072, 12, 12), t(512, 2048, 12, 8), 224, 32, 512),
            "vit-b-16" => (t(768, 3072, 12, 12), t(512, 2048, 12, 8), 224, 16, 512),
            "vit-l-14" => (t(1024, 4096, 24, 16), t(768, 3072, 12, 12), 224, 14, 768),
            "vit-l-14-336" => (t(1024, 4096, 24, 16), t(768, 3072, 12, 12), 336, 14, 768),
            _ => bail!("unknown CLIP architecture '{name}' (vit-b-32, vit-b-16, vit-l-14, vit-l-14-336)"),
        };
        Ok(ClipConfig { text, vision, vocab_size: 49408, max_positions: 77, eos_token_id: 49407, image_size, patch_size, channels: 3, projection_dim })
    }

    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Every parameter the checkpoint must hold, with its shape.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut p: Vec<(String, Vec<usize>)> = Vec::new();
        let blocks = |prefix: &str, t: &TowerConfig, p: &mut Vec<(String, Vec<usize>)>| {
            let (d, f) = (t.hidden, t.intermediate);
            for i in 0..t.layers {
                let l = format!("{prefix}.encoder.layers.{i}");
                for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    p.push((format!("{l}.self_attn.{proj}.weight"), vec![d, d]));
                    p.push((format!("{l}.self_attn.{proj}.bias"), vec![d]));
                }
                for ln in ["layer_norm1", "layer_norm2"] {
                    p.push((format!("{l}.{ln}.weight"), vec![d]));
                    p.push((format!("{l}.{ln}.bias"), vec![d]));
                }
                p.push((format!("{l}.mlp.fc1.weight"), vec![f, d]));
                p.push((format!("{l}.mlp.fc1.bias"), vec![f]));
                p.push((format!("{l}.mlp.fc2.weight"), vec![d, f]));
                p.push((format!("{l}.mlp.fc2.bias"), vec![d]));
            }
        };
        let (td, vd) = (self.text.hidden, self.vision.hidden);
        p.push(("text_model.embeddings.token_embedding.weight".into(), vec![self.vocab_size, td]));
        p.push(("text_model.embeddings.position_embedding.weight".into(), vec![self.max_positions, td]));
        blocks("text_model", &self.text, &mut p);
        p.push(("text_model.final_layer_norm.weight".into(), vec![td]));
        p.push(("text_model.final_layer_norm.bias".into(), vec![td]));
        p.push(("vision_model.embeddings.class_embedding".into(), vec![vd]));
        p.push(("vision_model.embeddings.patch_embedding.weight".into(), vec![vd, self.channels, self.patch_size, self.patch_size]));
        p.push(("vision_model.embeddings.position_embedding.weight".into(), vec![self.grid() * self.grid() + 1, vd]));
        p.push(("vision_model.pre_layrnorm.weight".into(), vec![vd]));
        p.push(("vision_model.pre_layrnorm.bias".into(), vec![vd]));
        blocks("vision_model", &self.vision, &mut p);
        p.push(("vision_model.post_layernorm.weight".into(), vec![vd]));
        p.push(("vision_model.post_layernorm.bias".into(), vec![vd]));
        p.push(("visual_projection.weight".into(), vec![self.projection_dim, vd]));
        p.push(("text_projection.weight".into(), vec![self.projection_dim, td]));
        p.push(("logit_scale".into(), vec![]));
        p
    }
}

/// CLIP's image processor settings (`preprocessor_config.json`; CLIP's defaults without one).
#[derive(Clone, Debug, PartialEq)]
pub struct ClipProcessor {
    pub do_resize: bool,
    /// `size.shortest_edge` (`None` with an explicit `size.height/width`).
    pub shortest_edge: Option<usize>,
    pub resize_hw: Option<(usize, usize)>,
    pub do_center_crop: bool,
    pub crop_hw: (usize, usize),
    pub do_normalize: bool,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl ClipProcessor {
    /// CLIP's processor for `size × size` models.
    pub fn default_for(size: usize) -> Self {
        ClipProcessor { do_resize: true, shortest_edge: Some(size), resize_hw: None, do_center_crop: true, crop_hw: (size, size), do_normalize: true, mean: CLIP_MEAN, std: CLIP_STD }
    }

    /// From a `preprocessor_config.json` object; absent fields keep CLIP's defaults.
    pub fn from_json(v: &Value, size: usize) -> Result<Self> {
        let mut p = Self::default_for(size);
        let flag = |k: &str, d: bool| v.get(k).and_then(|x| x.as_bool()).unwrap_or(d);
        p.do_resize = flag("do_resize", true);
        p.do_center_crop = flag("do_center_crop", true);
        p.do_normalize = flag("do_normalize", true);
        match v.get("size") {
            Some(Value::Number(n)) => p.shortest_edge = Some(n.as_u64().context("size")? as usize),
            Some(Value::Object(m)) => {
                if let Some(s) = m.get("shortest_edge") {
                    p.shortest_edge = Some(s.as_u64().context("size.shortest_edge")? as usize);
                } else {
                    let h = m.get("height").and_then(|x| x.as_u64()).context("size needs shortest_edge or height and width")?;
                    let w = m.get("width").and_then(|x| x.as_u64()).context("size needs shortest_edge or height and width")?;
                    p.shortest_edge = None;
                    p.resize_hw = Some((h as usize, w as usize));
                }
            }
            _ => {}
        }
        match v.get("crop_size") {
            Some(Value::Number(n)) => {
                let s = n.as_u64().context("crop_size")? as usize;
                p.crop_hw = (s, s);
            }
            Some(Value::Object(m)) => {
                let h = m.get("height").and_then(|x| x.as_u64()).context("crop_size.height")?;
                let w = m.get("width").and_then(|x| x.as_u64()).context("crop_size.width")?;
                p.crop_hw = (h as usize, w as usize);
            }
            _ => {}
        }
        let triple = |k: &str, d: [f32; 3]| -> Result<[f32; 3]> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(d),
                Some(Value::Array(a)) if a.len() == 3 => {
                    let mut o = [0.0f32; 3];
                    for (i, x) in a.iter().enumerate() {
                        o[i] = x.as_f64().with_context(|| format!("{k}[{i}]"))? as f32;
                    }
                    Ok(o)
                }
                Some(x) => bail!("{k} is {x}, expected three numbers"),
            }
        };
        p.mean = triple("image_mean", CLIP_MEAN)?;
        p.std = triple("image_std", CLIP_STD)?;
        if p.std.iter().any(|&s| !(s > 0.0)) {
            bail!("image_std {:?} must be positive", p.std);
        }
        if let Some(r) = v.get("resample").and_then(|r| r.as_u64())
            && r != 3
        {
            bail!("preprocessor resample {r}: only bicubic (3), CLIP's, is implemented");
        }
        Ok(p)
    }

    /// The size an `h × w` image is resized to.
    pub fn resized(&self, h: usize, w: usize) -> (usize, usize) {
        if !self.do_resize {
            return (h, w);
        }
        if let Some((rh, rw)) = self.resize_hw {
            return (rh, rw);
        }
        let s = self.shortest_edge.unwrap_or(h.min(w));
        // transformers' get_resize_output_image_size(default_to_square=False)
        if w <= h { ((s as f64 * h as f64 / w as f64) as usize, s) } else { (s, (s as f64 * w as f64 / h as f64) as usize) }
    }

    /// The processor's output size for an `h × w` input.
    pub fn output(&self, h: usize, w: usize) -> (usize, usize) {
        if self.do_center_crop { self.crop_hw } else { self.resized(h, w) }
    }
}

/// PIL's bicubic filter (a = −0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

/// The `[out, in]` matrix of PIL's bicubic resampling of `n_in` pixels to `n_out` (its
/// `precompute_coeffs`: support widened by the downscale factor, weights normalised over the
/// taps inside the image), rows `first..first + rows` only (a centre crop).
pub fn pil_bicubic_matrix(n_in: usize, n_out: usize, first: usize, rows: usize) -> Vec<f32> {
    let scale = n_in as f64 / n_out as f64;
    let fs = scale.max(1.0);
    let support = 2.0 * fs;
    let mut m = vec![0.0f32; rows * n_in];
    for (r, xx) in (first..first + rows).enumerate() {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
        let w: Vec<f64> = (xmin..xmax).map(|x| bicubic((x as f64 - center + 0.5) / fs)).collect();
        let total: f64 = w.iter().sum();
        for (x, wx) in (xmin..xmax).zip(w) {
            m[r * n_in + x] = if total != 0.0 { (wx / total) as f32 } else { wx as f32 };
        }
    }
    m
}

fn clamp01(x: &Tensor) -> Result<Tensor> {
    // min(max(x, 0), 1) = relu(x) − relu(x − 1)
    x.unary(UnaryOp::Relu, 0.0)?.sub(&x.add_scalar(-1.0)?.unary(UnaryOp::Relu, 0.0)?)
}

/// One transformer block's tensors.
struct Block {
    ln1: (Tensor, Tensor),
    /// `q|k|v` projections stacked: `[3·D, D]`, `[3·D]`.
    qkv: (Tensor, Tensor),
    out: (Tensor, Tensor),
    ln2: (Tensor, Tensor),
    fc1: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
}

/// A loaded CLIP model with its tokenizer and processor.
pub struct ClipModel {
    pub config: ClipConfig,
    pub processor: ClipProcessor,
    pub tokenizer: ClipTokenizer,
    params: ParamStore,
    text_blocks: Vec<Block>,
    vision_blocks: Vec<Block>,
    device: Device,
    /// The matrix products' dtype ([`ClipModel::to_precision`]).
    dtype: DType,
    /// The non-block weights of the matrix products in `dtype` (empty in f32).
    half: Vec<(String, Tensor)>,
    pub dir: PathBuf,
}

/// A JSON file of the model folder, with its path in the errors.
pub(crate) fn read_json(p: &Path) -> Result<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?).with_context(|| format!("{} is not JSON", p.display()))
}

fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v["weight_map"].as_object().with_context(|| format!("{} has no weight_map", index.display()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for f in map.values().filter_map(|f| f.as_str()) {
            let p = dir.join(f);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        return Ok(files);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.is_file() {
        return Ok(vec![bin]);
    }
    bail!("no CLIP weights in {}: looked for model.safetensors, model.safetensors.index.json and pytorch_model.bin", dir.display())
}

impl ClipModel {
    /// Load a Hugging Face CLIP folder onto `device`.
    pub fn from_dir(dir: &Path, device: Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!(
                "CLIP model folder {} does not exist: it needs config.json, model.safetensors (or model.safetensors.index.json / pytorch_model.bin) and tokenizer.json (or vocab.json + merges.txt); see the README's CLIP section for how to save one",
                dir.display()
            );
        }
        let cfg_path = dir.join("config.json");
        if !cfg_path.is_file() {
            bail!("no config.json in CLIP model folder {} (it needs config.json, model.safetensors and tokenizer.json or vocab.json + merges.txt)", dir.display());
        }
        let cv = read_json(&cfg_path)?;
        let config = ClipConfig::from_json(&cv).with_context(|| format!("in {}", cfg_path.display()))?;
        // preprocessor_config.json, or the image_processor entry of the processor_config.json
        // that transformers 5's CLIPProcessor.save_pretrained writes
        let (pp, proc_all) = (dir.join("preprocessor_config.json"), dir.join("processor_config.json"));
        let processor = if pp.is_file() {
            ClipProcessor::from_json(&read_json(&pp)?, config.image_size).with_context(|| format!("in {}", pp.display()))?
        } else if proc_all.is_file()
            && let Some(ip) = read_json(&proc_all)?.get("image_processor").filter(|v| v.is_object())
        {
            ClipProcessor::from_json(ip, config.image_size).with_context(|| format!("in {} (image_processor)", proc_all.display()))?
        } else {
            ClipProcessor::default_for(config.image_size)
        };
        let tokenizer = ClipTokenizer::from_dir(dir, config.max_positions)?;
        if tokenizer.vocab_size() > config.vocab_size {
            bail!("the tokenizer in {} has {} tokens, the text model's embedding {}", dir.display(), tokenizer.vocab_size(), config.vocab_size);
        }
        let mut params = ParamStore::new();
        for (n, s) in config.param_shapes() {
            params.add(n, Tensor::zeros(&s));
        }
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for f in weight_files(dir)? {
            let raw = crate::io::model::read_weights(&f, None).with_context(|| format!("reading {}", f.display()))?;
            // the position_ids buffers older checkpoints carry are not parameters
            tensors.extend(raw.tensors.into_iter().filter(|(n, _)| !n.ends_with("embeddings.position_ids")));
        }
        params.load_strict(tensors).with_context(|| format!("loading the CLIP weights of {}", dir.display()))?;
        Self::assemble(config, processor, tokenizer, params, device, dir)
    }

    /// A model of `config` with random weights (N(0, 0.02²), LayerNorms at 1 and 0) and a
    /// byte-level tokenizer without merges: for benchmarks, no files needed.
    pub fn random(config: ClipConfig, seed: u64, device: Device) -> Result<Self> {
        let mut rng = crate::rng::Rng::new(seed);
        let mut params = ParamStore::new();
        for (n, s) in config.param_shapes() {
            let t = if n.contains("norm") || n.contains("layrnorm") {
                Tensor::full(&s, if n.ends_with(".weight") { 1.0 } else { 0.0 })
            } else if n == "logit_scale" {
                Tensor::full(&s, 100f32.ln())
            } else {
                Tensor::randn(&s, &mut rng).mul_scalar(0.02)?
            };
            params.add(n, t);
        }
        let processor = ClipProcessor::default_for(config.image_size);
        let tokenizer = ClipTokenizer::bytes_only(config.max_positions)?;
        Self::assemble(config, processor, tokenizer, params, device, Path::new("(random weights)"))
    }

    fn assemble(config: ClipConfig, processor: ClipProcessor, tokenizer: ClipTokenizer, params: ParamStore, device: Device, dir: &Path) -> Result<Self> {
        params.to_device(device)?;
        let (text_blocks, vision_blocks) = Self::blocks(&config, &params)?;
        Ok(ClipModel { config, processor, tokenizer, params, text_blocks, vision_blocks, device, dtype: DType::F32, half: Vec::new(), dir: dir.to_path_buf() })
    }

    /// Run the towers' matrix products in `dtype` (f32, f16 or bf16), as PyTorch's autocast
    /// does: the linear layers' weights, inputs and outputs (attention included) in it, GEMMs
    /// accumulating in f32; the residual stream, the LayerNorms, the embeddings, the processor,
    /// `logit_scale` and the similarities stay f32.
    pub fn to_precision(&mut self, dtype: DType) -> Result<()> {
        let (mut t, mut v) = Self::blocks(&self.config, &self.params)?;
        for b in t.iter_mut().chain(v.iter_mut()) {
            for p in [&mut b.qkv, &mut b.out, &mut b.fc1, &mut b.fc2] {
                *p = (p.0.to_dtype(dtype)?, p.1.to_dtype(dtype)?);
            }
        }
        self.text_blocks = t;
        self.vision_blocks = v;
        self.half = ["vision_model.embeddings.patch_embedding.weight", "visual_projection.weight", "text_projection.weight"].iter().map(|n| Ok((n.to_string(), self.p(n).to_dtype(dtype)?))).collect::<Result<_>>()?;
        self.dtype = dtype;
        Ok(())
    }

    /// A parameter in the matrix products' dtype.
    fn pd(&self, n: &str) -> Tensor {
        self.half.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone()).unwrap_or_else(|| self.p(n))
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn blocks(config: &ClipConfig, params: &ParamStore) -> Result<(Vec<Block>, Vec<Block>)> {
        let get = |n: &str| -> Tensor { params.get(n).expect("declared parameter").value() };
        let blocks = |prefix: &str, t: &TowerConfig| -> Result<Vec<Block>> {
            (0..t.layers)
                .map(|i| {
                    let l = format!("{prefix}.encoder.layers.{i}");
                    let pair = |n: &str| (get(&format!("{l}.{n}.weight")), get(&format!("{l}.{n}.bias")));
                    let (q, k, v) = (pair("self_attn.q_proj"), pair("self_attn.k_proj"), pair("self_attn.v_proj"));
                    Ok(Block {
                        ln1: pair("layer_norm1"),
                        qkv: (Tensor::concat(&[q.0, k.0, v.0], 0)?, Tensor::concat(&[q.1, k.1, v.1], 0)?),
                        out: pair("self_attn.out_proj"),
                        ln2: pair("layer_norm2"),
                        fc1: pair("mlp.fc1"),
                        fc2: pair("mlp.fc2"),
                    })
                })
                .collect()
        };
        Ok((blocks("text_model", &config.text)?, blocks("vision_model", &config.vision)?))
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn p(&self, n: &str) -> Tensor {
        self.params.get(n).expect("declared parameter").value()
    }

    /// `exp(logit_scale)`.
    pub fn logit_scale(&self) -> Result<f32> {
        Ok(self.p("logit_scale").to_cpu()?.item().exp())
    }

    /// Images `[B, C, H, W]` in [-1, 1] (C = 1 or 3) to the vision tower's input `[B, 3, S, S]`,
    /// on the model's device.
    pub fn preprocess(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape().to_vec();
        if s.len() != 4 || !(s[1] == 1 || s[1] == 3) {
            bail!("CLIP takes images [B, 1 or 3, H, W], got {s:?}");
        }
        let (b, h, w) = (s[0], s[2], s[3]);
        let cn = self.config.channels;
        if cn != 3 {
            bail!("CLIP vision towers with {cn} channels are not supported (3 expected)");
        }
        let x = x.to_device(self.device)?.to_dtype(DType::F32)?;
        let x = if s[1] == 1 { x.broadcast_to(&[b, 3, h, w])? } else { x };
        let x = clamp01(&x.add_scalar(1.0)?.mul_scalar(0.5)?)?;
        let p = &self.processor;
        let (rh, rw) = p.resized(h, w);
        let (oh, ow) = p.output(h, w);
        if oh > rh || ow > rw {
            bail!("the processor crops {oh}×{ow} out of {rh}×{rw} resized images");
        }
        let (top, left) = ((rh - oh) / 2, (rw - ow) / 2);
        let rm = |n_in: usize, n_out: usize, first: usize, rows: usize| -> Result<Tensor> {
            let m = if p.do_resize {
                pil_bicubic_matrix(n_in, n_out, first, rows)
            } else {
                let mut m = vec![0.0f32; rows * n_in];
                for r in 0..rows {
                    m[r * n_in + first + r] = 1.0;
                }
                m
            };
            Tensor::from_vec(m, &[rows, n_in]).to_device(self.device)
        };
        let (mw, mh) = (rm(w, rw, left, ow)?, rm(h, rh, top, oh)?);
        // horizontal pass, clamp, vertical pass, clamp (PIL on 8-bit images)
        let t = x.reshape(&[b * 3 * h, w])?.matmul_t(false, &mw, true, 1.0)?;
        let t = clamp01(&t)?.reshape(&[b * 3, h, ow])?.permute(&[0, 2, 1])?.reshape(&[b * 3 * ow, h])?;
        let t = t.matmul_t(false, &mh, true, 1.0)?;
        let t = clamp01(&t)?.reshape(&[b * 3, ow, oh])?.permute(&[0, 2, 1])?.reshape(&[b, 3, oh, ow])?;
        if !p.do_normalize {
            return Ok(t);
        }
        let inv: Vec<f32> = p.std.iter().map(|s| 1.0 / s).collect();
        let shift: Vec<f32> = p.mean.iter().zip(&p.std).map(|(m, s)| -m / s).collect();
        let inv = Tensor::from_vec(inv, &[1, 3, 1, 1]).to_device(self.device)?;
        let shift = Tensor::from_vec(shift, &[1, 3, 1, 1]).to_device(self.device)?;
        t.mul(&inv)?.add(&shift)
    }

    fn act(&self, x: &Tensor, a: Act) -> Result<Tensor> {
        match a {
            Act::QuickGelu => x.unary(UnaryOp::QuickGelu, 0.0),
            Act::Gelu => x.unary(UnaryOp::Gelu, 0.0),
            // 0.5·x·(1 + tanh(u)) = x·σ(2u), u = √(2/π)(x + 0.044715 x³)
            Act::GeluTanh => {
                let u = x.add(&x.mul(x)?.mul(x)?.mul_scalar(0.044_715)?)?.mul_scalar(2.0 * 0.797_884_6)?;
                x.mul(&u.unary(UnaryOp::Sigmoid, 0.0)?)
            }
        }
    }

    /// `LayerNorm` of the rows of `x [N, D]` (a one-group GroupNorm of `[N, D, 1, 1]`).
    fn layer_norm(x: &Tensor, p: &(Tensor, Tensor), eps: f32) -> Result<Tensor> {
        let s = x.shape().to_vec();
        let x4 = x.reshape(&[s[0], s[1], 1, 1])?;
        let g = x4.norm_geom(&p.0, &p.1, 1, eps)?;
        x4.group_norm(&p.0, &p.1, &g)?.0.reshape(&s)
    }

    /// One pre-LN block on `x [B·T, D]`; `mask` (the text tower's, one sequence) makes the
    /// attention causal.
    fn block(&self, x: &Tensor, blk: &Block, t: &TowerConfig, b: usize, len: usize, mask: Option<&Tensor>) -> Result<Tensor> {
        let (d, dt) = (t.hidden, self.dtype);
        let h = Self::layer_norm(x, &blk.ln1, t.eps)?.to_dtype(dt)?;
        let qkv = h.linear(&blk.qkv.0, Some(&blk.qkv.1))?;
        let a = match mask {
            Some(m) => Self::masked_attention(&qkv, m, t.heads, d)?,
            None => Self::attention(&qkv, b, len, t.heads, d)?,
        };
        let x = x.add(&a.linear(&blk.out.0, Some(&blk.out.1))?.to_dtype(DType::F32)?)?;
        let h = Self::layer_norm(&x, &blk.ln2, t.eps)?.to_dtype(dt)?;
        let m = self.act(&h.linear(&blk.fc1.0, Some(&blk.fc1.1))?, t.act)?.linear(&blk.fc2.0, Some(&blk.fc2.1))?;
        x.add(&m.to_dtype(DType::F32)?)
    }

    /// Softmax attention of `qkv [B·T, 3·D]` (the engine's QKV kernel) → `[B·T, D]`.
    fn attention(qkv: &Tensor, b: usize, len: usize, heads: usize, d: usize) -> Result<Tensor> {
        let q = qkv.reshape(&[b, len, 3 * d])?.permute(&[0, 2, 1])?;
        let g = q.attn_geom(heads, QkvOrder::New)?;
        let (o, _) = q.qkv_attention(&g)?;
        o.permute(&[0, 2, 1])?.reshape(&[b * len, d])
    }

    /// The additive causal mask `[len, len]` in the activations' dtype, on the model's device.
    fn causal_mask(&self, len: usize) -> Result<Tensor> {
        let mut mask = vec![0.0f32; len * len];
        for i in 0..len {
            for j in i + 1..len {
                mask[i * len + j] = if self.dtype == DType::F32 { f32::MIN } else { -3e4 };
            }
        }
        Tensor::from_vec(mask, &[len, len]).to_dtype(self.dtype)?.to_device(self.device)
    }

    /// Attention of one sequence's `qkv [T, 3·D]` under an additive `mask [T, T]`, a head at a
    /// time (the text tower runs once per run).
    fn masked_attention(qkv: &Tensor, mask: &Tensor, heads: usize, d: usize) -> Result<Tensor> {
        let hd = d / heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let outs = (0..heads)
            .map(|h| {
                let q = qkv.narrow(1, h * hd, hd)?;
                let k = qkv.narrow(1, d + h * hd, hd)?;
                let v = qkv.narrow(1, 2 * d + h * hd, hd)?;
                q.matmul_t(false, &k, true, scale)?.add(mask)?.softmax()?.matmul(&v)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::concat(&outs, 1)
    }

    /// Projected image embeddings `[B, projection_dim]` (not normalised) of processed pixels.
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        let s = pixels.shape().to_vec();
        if s.len() != 4 || s[1] != c.channels || s[2] != c.image_size || s[3] != c.image_size {
            bail!("the vision tower takes [B, {}, {}, {}] pixels, got {s:?}", c.channels, c.image_size, c.image_size);
        }
        let pixels = pixels.to_dtype(self.dtype)?;
        let (b, p, g, d) = (s[0], c.patch_size, c.grid(), c.vision.hidden);
        let n = g * g;
        // the patch convolution as one GEMM: [B·g², C·p²] · Wᵀ
        let cols = pixels.reshape(&[b, c.channels, g, p, g, p])?.permute(&[0, 2, 4, 1, 3, 5])?.reshape(&[b * n, c.channels * p * p])?;
        let w = self.pd("vision_model.embeddings.patch_embedding.weight").reshape(&[d, c.channels * p * p])?;
        let patches = cols.linear(&w, None)?.to_dtype(DType::F32)?.reshape(&[b, n, d])?;
        let cls = self.p("vision_model.embeddings.class_embedding").reshape(&[1, 1, d])?.broadcast_to(&[b, 1, d])?;
        let tokens = Tensor::concat(&[cls, patches], 1)?.add(&self.p("vision_model.embeddings.position_embedding.weight").reshape(&[1, n + 1, d])?)?;
        let mut x = Self::layer_norm(&tokens.reshape(&[b * (n + 1), d])?, &(self.p("vision_model.pre_layrnorm.weight"), self.p("vision_model.pre_layrnorm.bias")), c.vision.eps)?;
        for blk in &self.vision_blocks {
            x = self.block(&x, blk, &c.vision, b, n + 1, None)?;
        }
        let first = x.reshape(&[b, n + 1, d])?.narrow(1, 0, 1)?.reshape(&[b, d])?;
        let pooled = Self::layer_norm(&first, &(self.p("vision_model.post_layernorm.weight"), self.p("vision_model.post_layernorm.bias")), c.vision.eps)?;
        pooled.to_dtype(self.dtype)?.linear(&self.pd("visual_projection.weight"), None)?.to_dtype(DType::F32)
    }

    /// Projected text embeddings `[N, projection_dim]` (not normalised) of token sequences.
    pub fn text_features_ids(&self, seqs: &[Vec<u32>]) -> Result<Tensor> {
        let c = &self.config;
        let mut pooled = Vec::with_capacity(seqs.len());
        for ids in seqs {
            let len = ids.len();
            if len == 0 || len > c.max_positions {
                bail!("a token sequence of {len} tokens (1..={} allowed)", c.max_positions);
            }
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= c.vocab_size) {
                bail!("token id {bad} is outside the vocabulary of {}", c.vocab_size);
            }
            let idx: Vec<usize> = ids.iter().map(|&i| i as usize).collect();
            let tok = self.p("text_model.embeddings.token_embedding.weight").index_rows(&idx)?;
            let pos = self.p("text_model.embeddings.position_embedding.weight").narrow(0, 0, len)?;
            let mut x = tok.add(&pos)?;
            let mask = self.causal_mask(len)?;
            for blk in &self.text_blocks {
                x = self.block(&x, blk, &c.text, 1, len, Some(&mask))?;
            }
            // transformers: eos_token_id 2 (legacy configs) pools at the highest id, else at the
            // first eos_token_id (position 0 when there is none)
            let at = if c.eos_token_id == 2 { ids.iter().enumerate().fold((0, 0u32), |a, (i, &v)| if v > a.1 { (i, v) } else { a }).0 } else { ids.iter().position(|&v| v as i64 == c.eos_token_id).unwrap_or(0) };
            pooled.push(x.narrow(0, at, 1)?);
        }
        let h = Tensor::concat(&pooled, 0)?;
        let h = Self::layer_norm(&h, &(self.p("text_model.final_layer_norm.weight"), self.p("text_model.final_layer_norm.bias")), c.text.eps)?;
        h.to_dtype(self.dtype)?.linear(&self.pd("text_projection.weight"), None)?.to_dtype(DType::F32)
    }

    /// Projected text embeddings of prompts (tokenized, truncated to the context).
    pub fn text_features(&self, prompts: &[String]) -> Result<Tensor> {
        let seqs: Vec<Vec<u32>> = prompts.iter().map(|p| self.tokenizer.encode(p)).collect();
        self.text_features_ids(&seqs)
    }
}

/// Rows of `x [N, E]` divided by their L2 norms (on the host).
pub fn normalize_rows(x: &[f32], e: usize) -> Vec<f32> {
    let mut out = x.to_vec();
    for r in out.chunks_mut(e) {
        let n = r.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>().sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v = (*v as f64 / n) as f32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pil_rows_sum_to_one_and_identity_at_equal_size() {
        for (i, o) in [(32usize, 224usize), (28, 16), (20, 32), (5, 5)] {
            let m = pil_bicubic_matrix(i, o, 0, o);
            for r in m.chunks(i) {
                assert!((r.iter().map(|&v| v as f64).sum::<f64>() - 1.0).abs() < 1e-6);
            }
        }
        let m = pil_bicubic_matrix(7, 7, 0, 7);
        for r in 0..7 {
            for c in 0..7 {
                assert!((m[r * 7 + c] - if r == c { 1.0 } else { 0.0 }).abs() < 1e-7);
            }
        }
    }

    #[test]
    fn gelu_matches_erf_values() {
        // x·Φ(x) at points where Φ is known to 10 digits (scipy.stats.norm.cdf)
        for (x, cdf) in [(-3.0f32, 0.001_349_898_0f64), (-1.0, 0.158_655_253_9), (0.0, 0.5), (0.5, 0.691_462_461_3), (2.0, 0.977_249_868_1)] {
            let y = Tensor::from_vec(vec![x], &[1]).unary(UnaryOp::Gelu, 0.0).unwrap().item() as f64;
            let want = x as f64 * cdf;
            assert!((y - want).abs() <= 1e-6 * want.abs().max(1e-3), "gelu({x}) = {y}, want {want}");
        }
    }

    #[test]
    fn resize_follows_the_short_side() {
        let p = ClipProcessor::default_for(224);
        assert_eq!(p.resized(32, 32), (224, 224));
        assert_eq!(p.resized(20, 24), (224, 268));
        assert_eq!(p.resized(30, 20), (336, 224));
        assert_eq!(p.output(30, 20), (224, 224));
    }
}
