//! `UNetModelWrapper` configuration with torchcfm's keyword names and defaults.

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Map, Value};

use crate::util::nearest;

/// The keyword arguments of torchcfm 1.0.7 `UNetModelWrapper`, with its defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct UNetConfig {
    /// `(C, H, W)`; torchcfm uses `W` as the image size.
    pub dim: [usize; 3],
    pub num_channels: usize,
    pub num_res_blocks: usize,
    /// `None` means torchcfm's default for the image size.
    pub channel_mult: Option<Vec<f64>>,
    pub learn_sigma: bool,
    pub class_cond: bool,
    pub num_classes: usize,
    pub use_checkpoint: bool,
    /// Comma-separated resolutions `r`; attention where the downsample factor is `image_size // r`.
    pub attention_resolutions: String,
    pub num_heads: i64,
    pub num_head_channels: i64,
    pub num_heads_upsample: i64,
    pub use_scale_shift_norm: bool,
    pub dropout: f64,
    pub resblock_updown: bool,
    pub use_fp16: bool,
    pub use_new_attention_order: bool,
}

/// Every key a config may hold.
pub const CONFIG_KEYS: &[&str] = &[
    "dim",
    "num_channels",
    "num_res_blocks",
    "channel_mult",
    "learn_sigma",
    "class_cond",
    "num_classes",
    "use_checkpoint",
    "attention_resolutions",
    "num_heads",
    "num_head_channels",
    "num_heads_upsample",
    "use_scale_shift_norm",
    "dropout",
    "resblock_updown",
    "use_fp16",
    "use_new_attention_order",
];

impl UNetConfig {
    /// A config with torchcfm's defaults for everything but the three required arguments.
    pub fn new(dim: [usize; 3], num_channels: usize, num_res_blocks: usize) -> Self {
        UNetConfig {
            dim,
            num_channels,
            num_res_blocks,
            channel_mult: None,
            learn_sigma: false,
            class_cond: false,
            num_classes: 1000,
            use_checkpoint: false,
            attention_resolutions: "16".into(),
            num_heads: 1,
            num_head_channels: -1,
            num_heads_upsample: -1,
            use_scale_shift_norm: false,
            dropout: 0.0,
            resblock_updown: false,
            use_fp16: false,
            use_new_attention_order: false,
        }
    }

    /// torchcfm's MNIST example: `dim (1,28,28), num_channels 32, num_res_blocks 1`.
    pub fn mnist() -> Self {
        UNetConfig::new([1, 28, 28], 32, 1)
    }

    /// The bundled default: torchcfm's MNIST example with attention only at 7×7 (not 28×28),
    /// about half the compute per sample.
    pub fn mnist_small() -> Self {
        UNetConfig { attention_resolutions: "7".into(), ..UNetConfig::mnist() }
    }

    /// torchcfm's CIFAR-10 recipe (`train_cifar10.py`).
    pub fn cifar10() -> Self {
        UNetConfig { channel_mult: Some(vec![1.0, 2.0, 2.0, 2.0]), num_heads: 4, num_head_channels: 64, attention_resolutions: "16".into(), dropout: 0.1, ..UNetConfig::new([3, 32, 32], 128, 2) }
    }

    /// Parse a JSON object of `UNetModelWrapper` keyword arguments. Unknown keys are an error
    /// that names the closest valid key.
    pub fn from_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| anyhow!("a U-Net config must be a JSON object of UNetModelWrapper arguments"))?;
        for k in obj.keys() {
            if !CONFIG_KEYS.contains(&k.as_str()) {
                match nearest(k, CONFIG_KEYS.iter().copied()) {
                    Some(s) => bail!("unknown U-Net config key '{k}' (did you mean '{s}'?)"),
                    None => bail!("unknown U-Net config key '{k}'; valid keys: {}", CONFIG_KEYS.join(", ")),
                }
            }
        }
        let req = |k: &str| obj.get(k).ok_or_else(|| anyhow!("U-Net config is missing the required key '{k}'"));
        let dim_v = req("dim")?;
        let dim_a = dim_v.as_array().filter(|a| a.len() == 3).ok_or_else(|| anyhow!("U-Net config 'dim' must be [C, H, W], got {dim_v}"))?;
        let mut dim = [0usize; 3];
        for (i, d) in dim_a.iter().enumerate() {
            dim[i] = d.as_u64().filter(|&x| x > 0).ok_or_else(|| anyhow!("U-Net config 'dim' must hold positive integers, got {dim_v}"))? as usize;
        }
        let uint = |k: &str, v: &Value| -> Result<usize> { v.as_u64().map(|x| x as usize).ok_or_else(|| anyhow!("U-Net config '{k}' must be a non-negative integer, got {v}")) };
        let mut c = UNetConfig::new(dim, uint("num_channels", req("num_channels")?)?, uint("num_res_blocks", req("num_res_blocks")?)?);
        for (k, v) in obj {
            let int = || -> Result<i64> { v.as_i64().ok_or_else(|| anyhow!("U-Net config '{k}' must be an integer, got {v}")) };
            let boolean = || -> Result<bool> { v.as_bool().ok_or_else(|| anyhow!("U-Net config '{k}' must be true or false, got {v}")) };
            match k.as_str() {
                "dim" | "num_channels" | "num_res_blocks" => {}
                "channel_mult" => {
                    c.channel_mult = match v {
                        Value::Null => None,
                        Value::Array(a) => Some(a.iter().map(|x| x.as_f64().filter(|&f| f > 0.0).ok_or_else(|| anyhow!("U-Net config 'channel_mult' must hold positive numbers, got {v}"))).collect::<Result<_>>()?),
                        // torchcfm also accepts a string such as "1,2,2,2" in its scripts
                        Value::String(s) => {
                            Some(s.split(',').map(|p| p.trim().parse::<f64>().ok().filter(|&f| f > 0.0).ok_or_else(|| anyhow!("U-Net config 'channel_mult' has a bad entry in \"{s}\""))).collect::<Result<_>>()?)
                        }
                        _ => bail!("U-Net config 'channel_mult' must be a list such as [1, 2, 2, 2] or null, got {v}"),
                    };
                    if c.channel_mult.as_ref().is_some_and(|m| m.is_empty()) {
                        bail!("U-Net config 'channel_mult' must not be empty");
                    }
                }
                "learn_sigma" => c.learn_sigma = boolean()?,
                "class_cond" => c.class_cond = boolean()?,
                "num_classes" => c.num_classes = uint(k, v)?,
                "use_checkpoint" => c.use_checkpoint = boolean()?,
                "attention_resolutions" => {
                    c.attention_resolutions = match v {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        Value::Array(a) => a.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","),
                        _ => bail!("U-Net config 'attention_resolutions' must be a string such as \"16\" or \"16,8\", got {v}"),
                    }
                }
                "num_heads" => c.num_heads = int()?,
                "num_head_channels" => c.num_head_channels = int()?,
                "num_heads_upsample" => c.num_heads_upsample = int()?,
                "use_scale_shift_norm" => c.use_scale_shift_norm = boolean()?,
                "dropout" => c.dropout = v.as_f64().filter(|p| (0.0..1.0).contains(p)).ok_or_else(|| anyhow!("U-Net config 'dropout' must be a number in [0, 1), got {v}"))?,
                "resblock_updown" => c.resblock_updown = boolean()?,
                "use_fp16" => c.use_fp16 = boolean()?,
                "use_new_attention_order" => c.use_new_attention_order = boolean()?,
                _ => unreachable!("keys were checked above"),
            }
        }
        c.validate()?;
        Ok(c)
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(s).context("the U-Net config is not valid JSON")?;
        Self::from_json(&v)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let s = std::fs::read_to_string(path).with_context(|| format!("cannot read U-Net config {}", path.display()))?;
        Self::from_json_str(&s).with_context(|| format!("in U-Net config {}", path.display()))
    }

    /// The config as a JSON object with UNetModelWrapper's keyword names (what we write into
    /// safetensors metadata and what `UNetModelWrapper(**cfg)` accepts).
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("dim".into(), serde_json::json!(self.dim));
        m.insert("num_channels".into(), self.num_channels.into());
        m.insert("num_res_blocks".into(), self.num_res_blocks.into());
        m.insert(
            "channel_mult".into(),
            match &self.channel_mult {
                None => Value::Null,
                Some(v) => Value::Array(v.iter().map(|&f| if f.fract() == 0.0 { Value::from(f as i64) } else { Value::from(f) }).collect()),
            },
        );
        m.insert("learn_sigma".into(), self.learn_sigma.into());
        m.insert("class_cond".into(), self.class_cond.into());
        m.insert("num_classes".into(), self.num_classes.into());
        m.insert("use_checkpoint".into(), self.use_checkpoint.into());
        m.insert("attention_resolutions".into(), self.attention_resolutions.clone().into());
        m.insert("num_heads".into(), self.num_heads.into());
        m.insert("num_head_channels".into(), self.num_head_channels.into());
        m.insert("num_heads_upsample".into(), self.num_heads_upsample.into());
        m.insert("use_scale_shift_norm".into(), self.use_scale_shift_norm.into());
        m.insert("dropout".into(), self.dropout.into());
        m.insert("resblock_updown".into(), self.resblock_updown.into());
        m.insert("use_fp16".into(), self.use_fp16.into());
        m.insert("use_new_attention_order".into(), self.use_new_attention_order.into());
        Value::Object(m)
    }

    pub fn image_size(&self) -> usize {
        self.dim[2]
    }
    pub fn in_channels(&self) -> usize {
        self.dim[0]
    }
    pub fn out_channels(&self) -> usize {
        if self.learn_sigma { 2 * self.dim[0] } else { self.dim[0] }
    }
    pub fn num_classes_opt(&self) -> Option<usize> {
        self.class_cond.then_some(self.num_classes)
    }

    /// `channel_mult`, with torchcfm's per-image-size default when not given.
    pub fn channel_mult_resolved(&self) -> Result<Vec<f64>> {
        if let Some(m) = &self.channel_mult {
            return Ok(m.clone());
        }
        Ok(match self.image_size() {
            512 => vec![0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0],
            256 => vec![1.0, 1.0, 2.0, 2.0, 4.0, 4.0],
            128 => vec![1.0, 1.0, 2.0, 3.0, 4.0],
            64 => vec![1.0, 2.0, 3.0, 4.0],
            32 => vec![1.0, 2.0, 2.0, 2.0],
            28 => vec![1.0, 2.0, 2.0],
            s => bail!("torchcfm has no default channel_mult for image size {s} (it has 512, 256, 128, 64, 32, 28); give channel_mult"),
        })
    }

    /// The downsample factors `ds` at which attention is applied (`image_size // r`).
    pub fn attention_ds(&self) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        for p in self.attention_resolutions.split(',') {
            let p = p.trim();
            if p.is_empty() {
                continue;
            }
            let r: usize = p.parse().ok().filter(|&r| r > 0).ok_or_else(|| anyhow!("attention_resolutions \"{}\" must be positive integers separated by commas", self.attention_resolutions))?;
            out.push(self.image_size() / r);
        }
        Ok(out)
    }

    /// Heads of an attention block with `channels` channels (torchcfm's rule).
    pub fn heads_for(&self, channels: usize, upsample: bool) -> Result<usize> {
        let nh = if upsample && self.num_heads_upsample != -1 { self.num_heads_upsample } else { self.num_heads };
        if self.num_head_channels == -1 {
            if nh <= 0 || !channels.is_multiple_of(nh as usize) {
                bail!("num_heads{} = {nh} does not divide the {channels} channels of an attention block", if upsample { "_upsample" } else { "" });
            }
            Ok(nh as usize)
        } else {
            let hc = self.num_head_channels;
            if hc <= 0 || !channels.is_multiple_of(hc as usize) {
                bail!("num_head_channels = {hc} does not divide the {channels} channels of an attention block");
            }
            Ok(channels / hc as usize)
        }
    }

    /// Check everything torchcfm would reject at construction, with clear messages.
    pub fn validate(&self) -> Result<()> {
        if self.num_channels == 0 {
            bail!("num_channels must be positive");
        }
        let mult = self.channel_mult_resolved()?;
        self.attention_ds()?;
        for &m in &mult {
            let ch = (m * self.num_channels as f64) as usize;
            if ch == 0 || !ch.is_multiple_of(32) {
                bail!("channel_mult {m} × num_channels {} = {ch} channels, which GroupNorm(32) cannot split into 32 groups", self.num_channels);
            }
        }
        if self.class_cond && self.num_classes == 0 {
            bail!("class_cond needs num_classes > 0");
        }
        if self.num_heads_upsample == 0 || self.num_heads == 0 {
            bail!("num_heads and num_heads_upsample must be positive (or -1 for num_heads_upsample)");
        }
        Ok(())
    }
}

/// A U-Net config from a JSON file, or a built-in name: `mnist`, `mnist-small`, `cifar10`.
pub fn resolve_config(s: &str) -> Result<UNetConfig> {
    let p = std::path::Path::new(s);
    if p.exists() {
        return UNetConfig::from_file(p);
    }
    match s {
        "mnist" => Ok(UNetConfig::mnist()),
        "mnist-small" => Ok(UNetConfig::mnist_small()),
        "cifar10" | "cifar" => Ok(UNetConfig::cifar10()),
        _ => bail!("U-Net config {s} does not exist (built-in configs: mnist, mnist-small, cifar10)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn typo_suggests_nearest() {
        let e = UNetConfig::from_json_str(r#"{"dim":[1,28,28],"num_channels":32,"num_res_blocks":1,"num_head_channel":64}"#).unwrap_err();
        assert!(format!("{e:#}").contains("did you mean 'num_head_channels'"), "{e:#}");
    }
    #[test]
    fn roundtrip_and_defaults() {
        let c = UNetConfig::cifar10();
        let back = UNetConfig::from_json(&c.to_json()).unwrap();
        assert_eq!(c, back);
        assert_eq!(UNetConfig::mnist().channel_mult_resolved().unwrap(), vec![1.0, 2.0, 2.0]);
        assert_eq!(UNetConfig::mnist().attention_ds().unwrap(), vec![1]);
        assert_eq!(UNetConfig::cifar10().attention_ds().unwrap(), vec![2]);
        assert_eq!(UNetConfig::cifar10().heads_for(256, false).unwrap(), 4);
    }
}
