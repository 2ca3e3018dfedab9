//! Loading and saving U-Nets: weights read by [`crate::io::model`] (safetensors or torchcfm
//! `.pt`), with the config given, read from metadata, or inferred from the weights.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};

use super::{Init, UNetConfig, UNetModel};
use crate::io::model::{RawWeights, read_weights};
use crate::tensor::{DType, Tensor};

/// Where the config of a loaded model came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigSource {
    File(String),
    Metadata,
    Inferred,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(p) => write!(f, "config file {p}"),
            ConfigSource::Metadata => write!(f, "unet_config metadata in the weights file"),
            ConfigSource::Inferred => write!(f, "inferred from the weights"),
        }
    }
}

/// A model read from disk.
pub struct LoadedModel {
    pub model: UNetModel,
    pub config_source: ConfigSource,
    /// What could not be inferred, and what was assumed instead.
    pub warnings: Vec<String>,
    /// For `.pt` checkpoints: which entry was used (`ema_model`, ...).
    pub checkpoint_key: Option<String>,
    /// Float dtypes found in the file.
    pub dtypes: Vec<String>,
}

fn shape_of<'a>(m: &'a HashMap<&str, &Tensor>, k: &str) -> Result<&'a [usize]> {
    m.get(k).map(|t| t.shape()).ok_or_else(|| anyhow!("cannot infer the U-Net config: key '{k}' is missing (is this a torchcfm UNetModelWrapper state_dict?)"))
}

/// Infer a config from the keys and shapes of a torchcfm U-Net state_dict. Returns the config
/// and warnings naming what could not be inferred.
pub fn infer_config(tensors: &[(String, Tensor)]) -> Result<(UNetConfig, Vec<String>)> {
    let m: HashMap<&str, &Tensor> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let te = shape_of(&m, "time_embed.0.weight")?;
    if te.len() != 2 || te[0] != 4 * te[1] {
        bail!("cannot infer the U-Net config: time_embed.0.weight has shape {te:?}, expected [4·mc, mc]");
    }
    let mc = te[1];
    let conv_in = shape_of(&m, "input_blocks.0.0.weight")?;
    if conv_in.len() != 4 {
        bail!("cannot infer the U-Net config: input_blocks.0.0.weight has shape {conv_in:?}");
    }
    let (ch0, in_ch) = (conv_in[0], conv_in[1]);
    let out_ch = shape_of(&m, "out.2.weight")?[0];
    let learn_sigma = if out_ch == in_ch {
        false
    } else if out_ch == 2 * in_ch {
        true
    } else {
        bail!("cannot infer the U-Net config: {out_ch} output channels for {in_ch} input channels");
    };
    let block_index = |prefix: &str| -> BTreeSet<usize> { m.keys().filter_map(|k| k.strip_prefix(prefix)).filter_map(|r| r.split('.').next()?.parse().ok()).collect() };
    let n_in = block_index("input_blocks.").len();
    let outs = block_index("output_blocks.");
    let n_out = outs.len();
    // an output block that upsamples has an Upsample (.k.conv) or a ResBlock(up) (.k.in_layers) at k ≥ 1
    let ups = outs.iter().filter(|&&i| (1..4).any(|k| m.contains_key(format!("output_blocks.{i}.{k}.conv.weight").as_str()) || m.contains_key(format!("output_blocks.{i}.{k}.in_layers.0.weight").as_str()))).count();
    let levels = ups + 1;
    if n_out == 0 || n_out % levels != 0 || n_in != n_out {
        bail!("cannot infer the U-Net config: {n_in} input blocks and {n_out} output blocks do not form a torchcfm U-Net");
    }
    let nrb = n_out / levels - 1;
    let resblock_updown = levels > 1 && !m.contains_key(format!("input_blocks.{}.0.op.weight", nrb + 1).as_str());
    let mut mult = Vec::new();
    let mut attn_levels = Vec::new();
    for l in 0..levels {
        // the first output block of level l (output blocks run from the deepest level up)
        let ob = (levels - 1 - l) * (nrb + 1);
        let w = shape_of(&m, &format!("output_blocks.{ob}.0.out_layers.3.weight"))?;
        if w[0] % mc != 0 && (w[0] * 2) % mc != 0 {
            bail!("cannot infer the U-Net config: {} channels at level {l} are not a multiple of num_channels {mc}", w[0]);
        }
        mult.push(w[0] as f64 / mc as f64);
        if m.contains_key(format!("output_blocks.{ob}.1.qkv.weight").as_str()) {
            attn_levels.push(l);
        }
    }
    if (mult[0] * mc as f64) as usize != ch0 {
        bail!("cannot infer the U-Net config: input conv has {ch0} channels but level 0 has {}", mult[0] * mc as f64);
    }
    let emb = shape_of(&m, "middle_block.0.emb_layers.1.weight")?[0];
    let mid = shape_of(&m, "middle_block.0.out_layers.3.weight")?[0];
    let scale_shift = emb == 2 * mid;
    let num_classes = m.get("label_emb.weight").map(|t| t.shape()[0]);

    let mut warnings = Vec::new();
    // image size: not stored in the weights; the torchcfm default for this channel_mult, else 32
    let default_for = |s: usize| UNetConfig::new([in_ch, s, s], mc, nrb).channel_mult_resolved().ok();
    let size = [28usize, 32, 64, 128, 256, 512].into_iter().find(|&s| default_for(s).as_deref() == Some(&mult[..])).unwrap_or_else(|| 32usize.max(1 << (levels - 1)));
    let mut cfg = UNetConfig::new([in_ch, size, size], mc, nrb);
    cfg.channel_mult = if default_for(size).as_deref() == Some(&mult[..]) { None } else { Some(mult.clone()) };
    cfg.learn_sigma = learn_sigma;
    cfg.use_scale_shift_norm = scale_shift;
    cfg.resblock_updown = resblock_updown;
    if let Some(n) = num_classes {
        cfg.class_cond = true;
        cfg.num_classes = n;
    }
    cfg.attention_resolutions = attn_levels.iter().map(|&l| (size >> l).to_string()).collect::<Vec<_>>().join(",");
    warnings.push(format!("image size is not stored in the weights; assumed {size}x{size} (it only fixes the attention_resolutions string)"));
    // head layout: torchcfm's CIFAR-10 recipe uses 64 channels per head; its other examples one head
    let cifar_recipe = mc == 128 && mult == [1.0, 2.0, 2.0, 2.0] && in_ch == 3;
    if cifar_recipe {
        cfg.num_heads = 4;
        cfg.num_head_channels = 64;
        warnings.push("attention head layout is not stored in the weights; assumed torchcfm's CIFAR-10 recipe (num_head_channels 64)".into());
    } else {
        warnings.push("attention head layout is not stored in the weights; assumed one head (num_heads 1, num_head_channels -1)".into());
    }
    warnings.push("attention order is not stored in the weights; assumed the legacy order (use_new_attention_order false)".into());
    warnings.push("dropout is not stored in the weights; assumed 0 (it only matters for training)".into());
    cfg.validate()?;
    Ok((cfg, warnings))
}

/// Load a model. Config precedence: `config_path`, then `unet_config` metadata, then inference.
pub fn load_model(path: &Path, config_path: Option<&Path>, pt_key: Option<&str>) -> Result<LoadedModel> {
    let raw = read_weights(path, pt_key)?;
    model_from_raw(raw, config_path).with_context(|| format!("loading {}", path.display()))
}

/// Build a model from weights already read.
pub fn model_from_raw(raw: RawWeights, config_path: Option<&Path>) -> Result<LoadedModel> {
    let mut warnings = Vec::new();
    let (cfg, source) = if let Some(cp) = config_path {
        (UNetConfig::from_file(cp)?, ConfigSource::File(cp.display().to_string()))
    } else if let Some(js) = raw.metadata.get("unet_config") {
        (UNetConfig::from_json_str(js).context("in the unet_config metadata")?, ConfigSource::Metadata)
    } else {
        let (c, w) = infer_config(&raw.tensors)?;
        warnings = w;
        (c, ConfigSource::Inferred)
    };
    if cfg.use_fp16 {
        warnings.push("use_fp16 is set in the config; the CPU engine computes in f32 (as torchcfm does unless convert_to_fp16() is called)".into());
    }
    let mut model = UNetModel::new(&cfg, Init::Zeros)?;
    model.params_mut().load_strict(raw.tensors).with_context(|| format!("with the U-Net config from the {source}"))?;
    Ok(LoadedModel { model, config_source: source, warnings, checkpoint_key: raw.checkpoint_key, dtypes: raw.dtypes })
}

/// Save a model as safetensors (torchcfm names, `unet_config` metadata), atomically.
pub fn save_model(model: &UNetModel, path: &Path, dtype: DType) -> Result<()> {
    let meta = HashMap::from([("unet_config".to_string(), model.config().to_json().to_string()), ("format".to_string(), "pt".to_string()), ("producer".to_string(), format!("orwcfm-fast {}", env!("CARGO_PKG_VERSION")))]);
    model.params().save_safetensors(path, dtype, &meta)
}
