//! Trainer checkpoints: everything needed to continue a run bit for bit.
//!
//! A run folder holds `reference.safetensors` (written once) and `checkpoints/step-NNNNNNNN/`
//! folders, each with:
//! - `net.safetensors`, `last_policy.safetensors` (and `ema.safetensors` when EMA is on): the
//!   weights in torchcfm naming, loadable by `forward`, `info` and PyTorch;
//! - `optimizer.safetensors`: Adam's moments (`exp_avg.<param>`, `exp_avg_sq.<param>`);
//! - `samples.safetensors`: samples drawn from the current policy and not yet trained on;
//! - `state.json`: config, step, epoch, Adam's settings and step, every RNG's state (the
//!   xoshiro generators under `rng`, the Philox noise streams' `(seed, offset)` under `philox`).
//!
//! A checkpoint is written into a temporary folder that is renamed into place when complete, and
//! `checkpoints/latest` (itself replaced atomically) names the newest one, so a crash or a full
//! disk in the middle of a save leaves the previous checkpoint intact.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use super::config::OrwConfig;
use super::trainer::{Batch, SamplePool, Trainer};
use crate::io::safetensors::{self as st, Out, write_atomic};
use crate::nn::VelocityField;
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// The `format` field of `state.json`. Version 2 draws its noise from Philox streams whose
/// `(seed, offset)` states are saved under `philox`.
pub const FORMAT: &str = "orwcfm-fast/orw-checkpoint/2";
/// Version 1 drew noise and dropout masks on the host with xoshiro (`rng.dropout`, no `philox`).
const FORMAT_V1: &str = "orwcfm-fast/orw-checkpoint/1";

/// An [`Rng`]'s state as JSON (exact: the spare normal as raw bits).
pub(crate) fn rng_json(r: &Rng) -> Value {
    let (s, spare) = r.state();
    // the spare normal as raw bits, so that it survives the round trip exactly
    json!({ "s": s.iter().map(|v| format!("{v:016x}")).collect::<Vec<_>>(), "spare_bits": spare.map(f32::to_bits) })
}

/// Adam's moments as `optimizer.safetensors` (`exp_avg.<param>`, `exp_avg_sq.<param>`; nothing
/// before the first step).
pub(crate) fn save_adam_moments(path: &Path, adam: &crate::optim::Adam, names: &[String]) -> Result<()> {
    if adam.exp_avg.is_empty() {
        return Ok(());
    }
    let mut outs: Vec<(String, Out)> = Vec::new();
    for (n, m) in names.iter().zip(&adam.exp_avg) {
        outs.push((format!("exp_avg.{n}"), Out::F(m)));
    }
    for (n, v) in names.iter().zip(&adam.exp_avg_sq) {
        outs.push((format!("exp_avg_sq.{n}"), Out::F(v)));
    }
    st::save(path, &outs, DType::F32, &HashMap::new())
}

/// The moments [`save_adam_moments`] wrote, checked against the parameters' names and shapes.
pub(crate) fn load_adam_moments(path: &Path, names: &[String], shapes: &[Vec<usize>]) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let of = st::load(path)?;
    let get = |prefix: &str, n: &str, shape: &[usize]| -> Result<Tensor> {
        let t = of.get(&format!("{prefix}.{n}")).ok_or_else(|| anyhow!("{} lacks {prefix}.{n}", path.display()))?;
        if t.shape() != shape {
            bail!("optimizer state {prefix}.{n} has shape {:?}, the parameter {:?}", t.shape(), shape);
        }
        Ok(t.clone())
    };
    let m = names.iter().zip(shapes).map(|(n, s)| get("exp_avg", n, s)).collect::<Result<_>>()?;
    let v = names.iter().zip(shapes).map(|(n, s)| get("exp_avg_sq", n, s)).collect::<Result<_>>()?;
    Ok((m, v))
}

/// The inverse of [`rng_json`].
pub(crate) fn rng_from_json(v: &Value) -> Result<Rng> {
    let s = v["s"].as_array().ok_or_else(|| anyhow!("RNG state has no 's'"))?;
    if s.len() != 4 {
        bail!("RNG state needs 4 words, has {}", s.len());
    }
    let mut w = [0u64; 4];
    for (i, x) in s.iter().enumerate() {
        let h = x.as_str().ok_or_else(|| anyhow!("RNG word {i} is not a string"))?;
        w[i] = u64::from_str_radix(h, 16).with_context(|| format!("RNG word {i} '{h}'"))?;
    }
    let spare = match &v["spare_bits"] {
        Value::Null => None,
        b => Some(f32::from_bits(b.as_u64().ok_or_else(|| anyhow!("RNG spare_bits is not an integer"))? as u32)),
    };
    Ok(Rng::from_state(w, spare))
}

fn labels_i64(y: &[usize]) -> Vec<i64> {
    y.iter().map(|&v| v as i64).collect()
}

fn labels_from(f: &st::StFile, name: &str) -> Result<Vec<usize>> {
    let (_, v) = f.get_int(name).ok_or_else(|| anyhow!("samples.safetensors lacks '{name}'"))?;
    Ok(v.iter().map(|&x| x as usize).collect())
}

/// The run folder and checkpoint folder a resume path names: a run folder (its `latest`
/// checkpoint) or a checkpoint folder itself.
pub fn locate(path: &Path) -> Result<(PathBuf, PathBuf)> {
    if path.join("state.json").is_file() {
        let run = path.parent().and_then(Path::parent).ok_or_else(|| anyhow!("checkpoint {} is not inside a run folder", path.display()))?;
        return Ok((run.to_path_buf(), path.to_path_buf()));
    }
    let latest = path.join("checkpoints").join("latest");
    if latest.is_file() {
        let name = std::fs::read_to_string(&latest).with_context(|| format!("reading {}", latest.display()))?;
        let ck = path.join("checkpoints").join(name.trim());
        if !ck.join("state.json").is_file() {
            bail!("{} names checkpoint '{}', which is missing or incomplete", latest.display(), name.trim());
        }
        return Ok((path.to_path_buf(), ck));
    }
    if !path.exists() {
        bail!("cannot resume: {} does not exist", path.display());
    }
    bail!("cannot resume from {}: it is neither a run folder with checkpoints/latest nor a checkpoint folder with state.json", path.display())
}

impl<M: VelocityField> Trainer<M> {
    /// Save a checkpoint of the current state in the run folder; returns its folder.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let run = self.run_dir.clone().ok_or_else(|| anyhow!("no run folder set: cannot save a checkpoint"))?;
        let ref_path = run.join("reference.safetensors");
        if !ref_path.is_file() {
            self.reference.save_file(&ref_path).context("saving the reference model")?;
        }
        let ckdir = run.join("checkpoints");
        std::fs::create_dir_all(&ckdir).with_context(|| format!("cannot create {}", ckdir.display()))?;
        let name = format!("step-{:08}", self.step);
        let tmp = ckdir.join(format!(".tmp-{name}-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        if let Err(e) = self.write_checkpoint_files(&tmp) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e.context(format!("saving checkpoint {name} (the previous checkpoint is kept)")));
        }
        let fin = ckdir.join(&name);
        if fin.exists() {
            std::fs::remove_dir_all(&fin).with_context(|| format!("cannot replace {}", fin.display()))?;
        }
        std::fs::rename(&tmp, &fin).with_context(|| format!("cannot move the checkpoint into {}", fin.display()))?;
        write_atomic(&ckdir.join("latest"), format!("{name}\n").as_bytes())?;
        self.prune_checkpoints(&ckdir, &name)?;
        Ok(fin)
    }

    fn prune_checkpoints(&self, ckdir: &Path, keep_name: &str) -> Result<()> {
        let mut names: Vec<String> = std::fs::read_dir(ckdir)?.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("step-")).collect();
        names.sort();
        let keep = self.cfg.keep_checkpoints.max(1);
        if names.len() > keep {
            for n in &names[..names.len() - keep] {
                if n != keep_name {
                    std::fs::remove_dir_all(ckdir.join(n)).with_context(|| format!("cannot delete old checkpoint {n}"))?;
                }
            }
        }
        Ok(())
    }

    /// Write the checkpoint's files into `dir` (an existing, empty folder).
    pub fn write_checkpoint_files(&self, dir: &Path) -> Result<()> {
        self.net.save_file(&dir.join("net.safetensors"))?;
        // fault injection for tests: `ORWCFM_FAIL_CHECKPOINT=<run folder>` fails saves into that run
        // folder after their first file, as a full disk would
        if let (Some(v), Some(run)) = (std::env::var_os("ORWCFM_FAIL_CHECKPOINT"), &self.run_dir)
            && Path::new(&v) == run.as_path()
        {
            bail!("injected failure (ORWCFM_FAIL_CHECKPOINT) after writing net.safetensors");
        }
        self.last_policy.save_file(&dir.join("last_policy.safetensors"))?;
        if let Some(e) = &self.ema {
            e.save_file(&dir.join("ema.safetensors"))?;
        }
        let meta = HashMap::new();
        save_adam_moments(&dir.join("optimizer.safetensors"), &self.adam, self.net.params().names())?;
        // samples of the current policy not yet used up
        let mut shape = vec![self.pool.r.len()];
        shape.extend(self.net.sample_shape());
        let pool_x = Tensor::from_vec(self.pool.x.clone(), &shape);
        let pool_r = Tensor::from_vec(self.pool.r.clone(), &[self.pool.r.len()]);
        let pool_y = labels_i64(&self.pool.y);
        let pool_y_shape = [pool_y.len()];
        let mut outs: Vec<(String, Out)> = Vec::new();
        if !self.pool.r.is_empty() {
            outs.push(("pool.x".into(), Out::F(&pool_x)));
            outs.push(("pool.r".into(), Out::F(&pool_r)));
            if !pool_y.is_empty() {
                outs.push(("pool.y".into(), Out::I64(&pool_y_shape, &pool_y)));
            }
        }
        let (batch_r, batch_y);
        let batch_y_shape;
        if let Some(b) = &self.current {
            batch_r = Tensor::from_vec(b.r.clone(), &[b.r.len()]);
            batch_y = b.y.as_deref().map(labels_i64);
            batch_y_shape = [b.r.len()];
            outs.push(("batch.x1".into(), Out::F(&b.x1)));
            outs.push(("batch.r".into(), Out::F(&batch_r)));
            if let Some(y) = &batch_y {
                outs.push(("batch.y".into(), Out::I64(&batch_y_shape, y)));
            }
        }
        if !outs.is_empty() {
            st::save(&dir.join("samples.safetensors"), &outs, DType::F32, &meta)?;
        }
        let a = &self.adam;
        let state = json!({
            "format": FORMAT,
            "producer": format!("orwcfm-fast {}", env!("CARGO_PKG_VERSION")),
            "config": self.cfg.to_json(),
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "has_ema": self.ema.is_some(),
            "adam": { "step": a.step, "lr": a.lr, "beta1": a.beta1, "beta2": a.beta2, "eps": a.eps, "weight_decay": a.weight_decay },
            "rng": { "sample": rng_json(&self.rng_sample), "train": rng_json(&self.rng_train) },
            "philox": serde_json::to_value(self.noise)?,
            "batch_uses_left": self.current.as_ref().map(|b| b.uses_left),
            "loss_scale": { "scale": self.loss_scale, "good_steps": self.scale_good_steps, "skipped_steps": self.skipped_steps },
        });
        write_atomic(&dir.join("state.json"), serde_json::to_string_pretty(&state)?.as_bytes())
    }

    /// Continue a run: `path` is a run folder (its latest checkpoint) or a checkpoint folder.
    /// The reference comes from the run folder's `reference.safetensors`, else from `ref_path`.
    /// The metrics files are not touched: `MetricsLog::create(run, Some(step))` cuts them back.
    pub fn resume(path: &Path) -> Result<Self> {
        let (run, ck) = locate(path)?;
        let sp = ck.join("state.json");
        let state: Value = serde_json::from_str(&std::fs::read_to_string(&sp).with_context(|| format!("reading {}", sp.display()))?).with_context(|| format!("{} is not valid JSON", sp.display()))?;
        if state["format"].as_str() == Some(FORMAT_V1) {
            bail!(
                "{} was written by an older orwcfm-fast ({FORMAT_V1}) that drew noise and dropout masks on the host with xoshiro; this version draws them with Philox streams on the device, so the run cannot continue its random streams bit for bit. Start a new run from its net.safetensors (or finish it with the version that wrote it)",
                sp.display()
            );
        }
        if state["format"].as_str() != Some(FORMAT) {
            bail!("{} is not an orwcfm-fast trainer checkpoint (format {}, expected {FORMAT})", sp.display(), state["format"]);
        }
        let cfg = OrwConfig::from_json_value(state["config"].clone()).context("the checkpoint's config")?;
        let net = M::load_file(&ck.join("net.safetensors"), None).context("loading net")?;
        let last_policy = M::load_file(&ck.join("last_policy.safetensors"), None).context("loading last_policy")?;
        let run_ref = run.join("reference.safetensors");
        let reference = if run_ref.is_file() {
            M::load_file(&run_ref, None).context("loading the reference")?
        } else if let Some(p) = &cfg.ref_path {
            M::load_file(Path::new(p), cfg.ref_key.as_deref()).context("loading the reference from ref_path")?
        } else {
            bail!("the run folder {} has no reference.safetensors and the config has no ref_path", run.display());
        };
        let mut tr = Trainer::with_reference(cfg, net, reference)?;
        tr.last_policy = last_policy;
        if state["has_ema"].as_bool() == Some(true) {
            tr.ema = Some(M::load_file(&ck.join("ema.safetensors"), None).context("loading ema")?);
        }
        let u = |k: &str| -> Result<u64> { state[k].as_u64().ok_or_else(|| anyhow!("state.json: '{k}' is missing or not an integer")) };
        tr.step = u("step")?;
        tr.epoch = u("epoch")?;
        tr.step_in_epoch = u("step_in_epoch")?;
        // f16's dynamic loss scale (absent in checkpoints written before mixed precision)
        let ls = &state["loss_scale"];
        if let Some(scale) = ls["scale"].as_f64() {
            tr.loss_scale = scale as f32;
            tr.scale_good_steps = ls["good_steps"].as_u64().unwrap_or(0);
            tr.skipped_steps = ls["skipped_steps"].as_u64().unwrap_or(0);
        }
        let a = &state["adam"];
        let f = |k: &str| -> Result<f32> { a[k].as_f64().map(|v| v as f32).ok_or_else(|| anyhow!("state.json: adam.{k} is missing")) };
        tr.adam.step = a["step"].as_u64().ok_or_else(|| anyhow!("state.json: adam.step is missing"))?;
        (tr.adam.lr, tr.adam.beta1, tr.adam.beta2, tr.adam.eps, tr.adam.weight_decay) = (f("lr")?, f("beta1")?, f("beta2")?, f("eps")?, f("weight_decay")?);
        let op = ck.join("optimizer.safetensors");
        if op.is_file() {
            let shapes: Vec<Vec<usize>> = tr.net.params().vars().iter().map(|v| v.shape()).collect();
            (tr.adam.exp_avg, tr.adam.exp_avg_sq) = load_adam_moments(&op, tr.net.params().names(), &shapes)?;
        } else if tr.adam.step > 0 {
            bail!("{} is missing although the optimizer has taken {} steps", op.display(), tr.adam.step);
        }
        let r = &state["rng"];
        tr.rng_sample = rng_from_json(&r["sample"]).context("state.json: rng.sample")?;
        tr.rng_train = rng_from_json(&r["train"]).context("state.json: rng.train")?;
        tr.noise = serde_json::from_value(state["philox"].clone()).context("state.json: 'philox' (the noise streams' seed and offset) is missing or malformed")?;
        let sp = ck.join("samples.safetensors");
        if sp.is_file() {
            let sf = st::load(&sp)?;
            let cond = tr.net.num_classes().is_some();
            if let (Some(x), Some(rr)) = (sf.get("pool.x"), sf.get("pool.r")) {
                tr.pool = SamplePool { x: x.to_vec(), y: if cond { labels_from(&sf, "pool.y")? } else { Vec::new() }, r: rr.to_vec() };
            }
            if let (Some(x1), Some(rr)) = (sf.get("batch.x1"), sf.get("batch.r")) {
                let uses_left = state["batch_uses_left"].as_u64().ok_or_else(|| anyhow!("state.json: batch_uses_left is missing"))? as usize;
                tr.current = Some(Batch { x1: x1.clone(), y: if cond { Some(labels_from(&sf, "batch.y")?) } else { None }, r: rr.to_vec(), uses_left });
            }
        }
        tr.run_dir = Some(run.clone());
        // a resume from an older checkpoint abandons the later ones: `latest` names this one
        if let Some(name) = ck.file_name() {
            write_atomic(&run.join("checkpoints").join("latest"), format!("{}\n", name.to_string_lossy()).as_bytes())?;
        }
        Ok(tr)
    }
}
