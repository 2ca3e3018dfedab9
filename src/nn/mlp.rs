//! A small time-conditioned MLP velocity field, laid out like torchcfm's `models.MLP`
//! (`net.0`, `net.2`, ... in an `nn.Sequential`, input `[x, t]`), with SiLU activations
//! (torchcfm uses SELU). Used by the 2-D demonstrations (`orwcfm-fast toy2d`).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use super::params::ParamStore;
use super::unet::Forward;
use super::velocity::VelocityField;
use crate::autograd::{Var, ops};
use crate::io::safetensors as st;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// Architecture of an [`Mlp`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Data dimension (input and output).
    pub dim: usize,
    /// Hidden width.
    pub width: usize,
    /// Number of hidden layers (torchcfm: 3).
    pub hidden_layers: usize,
}

/// `v(t, x) = Linear(SiLU(... Linear([x, t])))`.
#[derive(Clone)]
pub struct Mlp {
    config: MlpConfig,
    params: ParamStore,
}

impl Mlp {
    /// PyTorch's default `nn.Linear` init (weights and biases uniform in ±1/√fan_in), seeded.
    pub fn new(config: MlpConfig, seed: u64) -> Result<Self> {
        if config.dim == 0 || config.width == 0 || config.hidden_layers == 0 {
            bail!("MLP needs positive dim, width and hidden_layers, got {config:?}");
        }
        let mut rng = Rng::new(seed);
        let mut params = ParamStore::new();
        let mut fan_in = config.dim + 1;
        for l in 0..=config.hidden_layers {
            let out = if l == config.hidden_layers { config.dim } else { config.width };
            let b = 1.0 / (fan_in as f32).sqrt();
            params.add(format!("net.{}.weight", 2 * l), Tensor::rand_uniform(&[out, fan_in], -b, b, &mut rng));
            params.add(format!("net.{}.bias", 2 * l), Tensor::rand_uniform(&[out], -b, b, &mut rng));
            fan_in = out;
        }
        Ok(Mlp { config, params })
    }

    pub fn config(&self) -> &MlpConfig {
        &self.config
    }
}

impl VelocityField for Mlp {
    fn sample_shape(&self) -> Vec<usize> {
        vec![self.config.dim]
    }
    fn num_classes(&self) -> Option<usize> {
        None
    }
    fn forward(&self, t: &Var, x: &Var, y: Option<&[usize]>, _fw: &mut Forward) -> Result<Var> {
        if y.is_some() {
            bail!("the MLP is not class-conditional");
        }
        let xs = x.shape();
        if xs.len() != 2 || xs[1] != self.config.dim {
            bail!("MLP input must be [B, {}], got {xs:?}", self.config.dim);
        }
        let b = xs[0];
        let tv = t.value();
        let tcol = match tv.numel() {
            1 => Var::constant(Tensor::full(&[b, 1], tv.item())),
            n if n == b => ops::reshape(t, &[b, 1])?,
            n => bail!("t has {n} values for a batch of {b}"),
        };
        let mut h = ops::concat(&[x.clone(), tcol], 1)?;
        let n = self.config.hidden_layers;
        for l in 0..=n {
            let w = self.params.var(2 * l);
            let bias = self.params.var(2 * l + 1);
            h = ops::linear(&h, w, Some(bias))?;
            if l < n {
                h = ops::silu(&h)?;
            }
        }
        Ok(h)
    }
    fn params(&self) -> &ParamStore {
        &self.params
    }
    fn params_mut(&mut self) -> &mut ParamStore {
        &mut self.params
    }
    fn save_file(&self, path: &Path) -> Result<()> {
        let meta = HashMap::from([("mlp_config".to_string(), serde_json::to_string(&self.config)?)]);
        self.params.save_safetensors(path, DType::F32, &meta)
    }
    fn load_file(path: &Path, key: Option<&str>) -> Result<Self> {
        if let Some(k) = key {
            bail!("an MLP file has no entries to choose from (key '{k}')");
        }
        let f = st::load(path)?;
        let js = f.metadata.get("mlp_config").with_context(|| format!("{} has no mlp_config metadata: not an MLP saved by orwcfm-fast", path.display()))?;
        let cfg: MlpConfig = serde_json::from_str(js).context("parsing mlp_config")?;
        let mut m = Mlp::new(cfg, 0)?;
        m.params.load_strict(f.tensors).with_context(|| format!("loading {}", path.display()))?;
        Ok(m)
    }
}
