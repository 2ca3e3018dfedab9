//! `orwcfm-fast sweep`: one `train` experiment per value of α (and τ), then a table and a figure
//! of reward, quality against real images, diversity and class entropy against α: the
//! reward–diversity frontier of the method on the run's model and reward.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use super::train::{TrainArgs, TrainFlags};
use crate::io::safetensors::write_atomic;
use crate::plot::{Panel, Series, panels};

/// Flags of `sweep`.
#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// Values of α (w2_coefficient), one run each.
    #[arg(long, value_delimiter = ',', default_value = "0,0.1,0.3,1,3")]
    pub alphas: Vec<f32>,
    /// Values of τ (temperature); default: the config's one.
    #[arg(long, value_delimiter = ',')]
    pub taus: Vec<f32>,
    /// Folder of the runs (<out>/alpha<α>_tau<τ>/) and of sweep.json, sweep.md, sweep.csv and sweep.png.
    #[arg(long, default_value = "runs/sweep")]
    pub out: PathBuf,
    /// TOML config every run starts from (as `train --config`); flags below win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Run every experiment again even when its folder already holds a finished one.
    #[arg(long)]
    pub rerun: bool,
    #[command(flatten)]
    pub flags: TrainFlags,
}

/// One finished run's figures (from its summary.json).
fn row(alpha: f32, tau: f32, s: &Value) -> Value {
    json!({
        "alpha": short(alpha),
        "tau": short(tau),
        "reward": s["reward_mean_final"],
        "target_fraction": s["target_fraction_final"],
        "fd_real_target": s["fd_real_target_final"],
        "fd_real": s["fd_real_final"],
        "vendi": s["vendi_final"],
        "diversity_pixel": s["diversity_final"],
        "class_entropy_bits": s["class_entropy_bits_final"],
        "min_target_share": s["min_target_share_final"],
        "class_histogram": s["class_histogram_final"],
        "w2_to_reference": s["w2_to_reference_final"],
        "wall_time_s": s["wall_time_s"],
        "run_dir": s["run_dir"],
    })
}

fn f(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn cell(v: &Value, digits: usize) -> String {
    f(v).map_or("–".into(), |x| format!("{x:.digits$}"))
}

fn label(x: f32) -> String {
    format!("{x}")
}

/// `x` as the f64 of its shortest decimal form (0.3, not 0.30000001192092896).
fn short(x: f32) -> f64 {
    label(x).parse().unwrap_or(x as f64)
}

/// Write the table (Markdown and CSV), the JSON and the figure of the rows so far.
fn report(out: &Path, rows: &[Value], base: &Value, alphas: &[f32], taus: &[f32]) -> Result<()> {
    write_atomic(&out.join("sweep.json"), serde_json::to_string_pretty(&json!({ "base": base, "runs": rows }))?.as_bytes())?;
    let mut md = String::from("| α | τ | reward | target classes | FD to real targets | Vendi | class entropy (bits) | smallest target share | W2 to ref | minutes |\n|---|---|---|---|---|---|---|---|---|---|\n");
    md += &format!(
        "| base | – | {} | {} | {} (floor {}) | {} (real {}) | {} | {} | – | – |\n",
        cell(&base["reward"], 3),
        f(&base["target_fraction"]).map_or("–".into(), |x| format!("{:.1}%", 100.0 * x)),
        cell(&base["fd_real_target"], 2),
        cell(&base["fd_floor_target"], 2),
        cell(&base["vendi"], 2),
        cell(&base["vendi_real_target"], 2),
        cell(&base["class_entropy_bits"], 2),
        f(&base["min_target_share"]).map_or("–".into(), |x| format!("{:.1}%", 100.0 * x)),
    );
    let mut csv = String::from("alpha,tau,reward,target_fraction,fd_real_target,fd_real,vendi,class_entropy_bits,min_target_share,w2_to_reference,wall_time_s\n");
    for r in rows {
        md += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |\n",
            r["alpha"],
            r["tau"],
            cell(&r["reward"], 3),
            f(&r["target_fraction"]).map_or("–".into(), |x| format!("{:.1}%", 100.0 * x)),
            cell(&r["fd_real_target"], 2),
            cell(&r["vendi"], 2),
            cell(&r["class_entropy_bits"], 2),
            f(&r["min_target_share"]).map_or("–".into(), |x| format!("{:.1}%", 100.0 * x)),
            cell(&r["w2_to_reference"], 3),
            f(&r["wall_time_s"]).unwrap_or(0.0) / 60.0,
        );
        let keys = ["alpha", "tau", "reward", "target_fraction", "fd_real_target", "fd_real", "vendi", "class_entropy_bits", "min_target_share", "w2_to_reference", "wall_time_s"];
        csv += &keys.iter().map(|k| f(&r[*k]).map_or(String::new(), |x| x.to_string())).collect::<Vec<_>>().join(",");
        csv.push('\n');
    }
    write_atomic(&out.join("sweep.md"), md.as_bytes())?;
    write_atomic(&out.join("sweep.csv"), csv.as_bytes())?;
    let series = |key: &str| -> Vec<Series> {
        taus.iter()
            .map(|&t| Series {
                name: format!("τ = {t}"),
                points: alphas.iter().enumerate().filter_map(|(i, &a)| rows.iter().find(|r| f(&r["alpha"]) == Some(short(a)) && f(&r["tau"]) == Some(short(t))).and_then(|r| f(&r[key])).map(|y| (i as f64, y))).collect(),
            })
            .collect()
    };
    let refs = |pairs: &[(&str, &str)]| -> Vec<(String, f64)> { pairs.iter().filter_map(|(name, k)| f(&base[*k]).map(|v| (name.to_string(), v))).collect() };
    let ps = [
        Panel { title: "mean reward".into(), series: series("reward"), refs: refs(&[("pre-trained", "reward")]) },
        Panel { title: "FD to real target-class images (lower is better)".into(), series: series("fd_real_target"), refs: refs(&[("pre-trained", "fd_real_target"), ("real vs real", "fd_floor_target")]) },
        Panel { title: "Vendi score (effective distinct samples)".into(), series: series("vendi"), refs: refs(&[("pre-trained", "vendi"), ("real target images", "vendi_real_target")]) },
        Panel { title: "class entropy (bits)".into(), series: series("class_entropy_bits"), refs: refs(&[("pre-trained", "class_entropy_bits")]) },
    ];
    let labels: Vec<String> = alphas.iter().map(|&a| label(a)).collect();
    panels(&out.join("sweep.png"), "ORW-CFM-W2 against α (W2 coefficient)", "α", &labels, &ps, 2)
}

/// Run `sweep`.
pub fn run(a: &SweepArgs) -> Result<()> {
    for (k, given) in [("w2_coefficient", a.flags.w2_coefficient.is_some()), ("temperature", a.flags.temperature.is_some()), ("run_name", a.flags.run_name.is_some()), ("savedir", a.flags.savedir.is_some())] {
        if given {
            bail!("--{} is set by the sweep itself (use --alphas, --taus and --out)", k.replace('_', "-"));
        }
    }
    if a.alphas.is_empty() || a.alphas.iter().chain(&a.taus).any(|v| !v.is_finite() || *v < 0.0) {
        bail!("--alphas (and --taus) must be non-negative numbers");
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    // the τ of the config when none is given: resolve it as train would
    let taus: Vec<f32> = if a.taus.is_empty() {
        let file = a.config.as_deref().map(super::runconfig::read_toml).transpose()?;
        let (o, _) = super::runconfig::resolve(file, a.flags.overrides())?;
        vec![o.temperature]
    } else {
        a.taus.clone()
    };
    let t0 = Instant::now();
    let (mut rows, mut base) = (Vec::new(), Value::Null);
    let total = taus.len() * a.alphas.len();
    for &tau in &taus {
        for &alpha in &a.alphas {
            let name = format!("alpha{alpha}_tau{tau}");
            let dir = a.out.join(&name);
            let summary = dir.join("summary.json");
            if a.rerun || !summary.is_file() {
                let mut flags = a.flags.clone();
                flags.w2_coefficient = Some(alpha);
                flags.temperature = Some(tau);
                flags.run_name = Some(name.clone());
                flags.savedir = Some(a.out.display().to_string());
                flags.quiet = Some(flags.quiet.unwrap_or(true));
                println!("sweep: run {}/{total}: α {alpha}, τ {tau} → {}", rows.len() + 1, dir.display());
                super::train::run(&TrainArgs { config: a.config.clone(), resume: None, overwrite: true, flags }).with_context(|| format!("the run α {alpha}, τ {tau}"))?;
            } else {
                println!("sweep: run {}/{total}: α {alpha}, τ {tau}: finished before, kept ({})", rows.len() + 1, summary.display());
            }
            let s: Value = serde_json::from_str(&std::fs::read_to_string(&summary).with_context(|| format!("reading {}", summary.display()))?)?;
            if base.is_null() {
                // the pre-trained model's figures, from the run's own evaluation of it
                let init: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("eval_initial.json"))?)?;
                base = json!({
                    "reward": init["reward_mean"], "target_fraction": init["target_fraction"], "fd_real_target": init["fd_real_target"], "fd_real": init["fd_real"],
                    "fd_floor_target": init["fd_floor_target"], "fd_floor": init["fd_floor"], "vendi": init["vendi"], "vendi_real_target": init["vendi_real_target"],
                    "class_entropy_bits": init["class_entropy_bits"], "min_target_share": init["min_target_share"], "class_histogram": init["class_histogram"],
                });
            }
            rows.push(row(alpha, tau, &s));
            report(&a.out, &rows, &base, &a.alphas, &taus)?;
        }
    }
    let md = std::fs::read_to_string(a.out.join("sweep.md"))?;
    println!("{md}");
    println!("wrote {}/sweep.{{md,csv,json,png}} ({:.1} min)", a.out.display(), t0.elapsed().as_secs_f64() / 60.0);
    Ok(())
}
