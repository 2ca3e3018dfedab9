//! `orwcfm-fast classifier train|eval`: the CNN behind the `classifier` reward and the
//! feature-space diversity metric.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Result, bail};
use clap::Subcommand;

use crate::nn::classifier::{Classifier, ClassifierConfig, ClassifierTraining, train_classifier};

#[derive(Subcommand, Debug)]
pub enum ClassifierCmd {
    /// Train a classifier on labelled images and report held-out accuracy.
    Train {
        /// Labelled training data (see `pretrain --data`).
        #[arg(long, default_value = "mnist5k:train")]
        data: String,
        /// Labelled held-out data for the accuracy report.
        #[arg(long, default_value = "mnist5k:heldout")]
        heldout: String,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 8)]
        epochs: usize,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        #[arg(long, default_value_t = 1e-3)]
        lr: f32,
        /// Conv stage widths.
        #[arg(long, value_delimiter = ',', default_value = "32,64")]
        channels: Vec<usize>,
        #[arg(long, default_value_t = 128)]
        hidden: usize,
        /// Random shifts of up to N pixels as augmentation.
        #[arg(long, default_value_t = 2)]
        max_shift: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Accuracy of a classifier on labelled images.
    Eval {
        /// The classifier (default: the bundled MNIST digit classifier).
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long, default_value = "mnist5k:heldout")]
        data: String,
        /// Print a JSON line last.
        #[arg(long)]
        json: bool,
    },
}

/// The bundled MNIST digit classifier (trained by `classifier train`, command in assets/README.md).
pub fn bundled() -> Result<Classifier> {
    Classifier::from_bytes(include_bytes!("../../assets/models/mnist_classifier.safetensors"), "the bundled MNIST classifier")
}

pub fn load(path: Option<&std::path::Path>) -> Result<Classifier> {
    match path {
        Some(p) => Classifier::load_file(p),
        None => bundled(),
    }
}

pub fn run(c: &ClassifierCmd) -> Result<()> {
    match c {
        ClassifierCmd::Train { data, heldout, out, epochs, batch, lr, channels, hidden, max_shift, seed } => {
            let tr = crate::data::open(data)?;
            let ho = crate::data::open(heldout)?;
            let (Some(l), Some(k)) = (&tr.labels, tr.num_classes) else { bail!("{} has no labels", tr.source) };
            let Some(hl) = &ho.labels else { bail!("{} has no labels", ho.source) };
            let [c, h, w] = tr.sample_shape();
            if h != w {
                bail!("the classifier takes square images, {} has {h}×{w}", tr.source);
            }
            if ho.sample_shape() != [c, h, w] {
                bail!("held-out images {:?} differ from training images {:?}", ho.sample_shape(), [c, h, w]);
            }
            crate::util::check_writable(out)?;
            let cfg = ClassifierConfig { in_channels: c, image_size: h, num_classes: k, channels: channels.clone(), hidden: *hidden };
            let model = Classifier::new(cfg, *seed)?;
            println!("classifier: {} training images from {}, {} parameters", tr.len(), tr.source, model.params().count());
            let o = ClassifierTraining { epochs: *epochs, batch: *batch, lr: *lr, max_shift: *max_shift, seed: *seed };
            let t0 = Instant::now();
            let mut err = None;
            train_classifier(&model, &tr.images, l, &o, &mut |e, loss| match model.accuracy(&ho.images, hl) {
                Ok(acc) => println!("epoch {:>3}: loss {loss:.4}  held-out accuracy {:.2}%  ({:.0} s)", e + 1, 100.0 * acc, t0.elapsed().as_secs_f64()),
                Err(e) => err = Some(e),
            })?;
            if let Some(e) = err {
                return Err(e);
            }
            model.save_file(out)?;
            println!("held-out accuracy {:.2}% on {} images; wrote {}", 100.0 * model.accuracy(&ho.images, hl)?, ho.len(), out.display());
            Ok(())
        }
        ClassifierCmd::Eval { model, data, json } => {
            let m = load(model.as_deref())?;
            let d = crate::data::open(data)?;
            let Some(l) = &d.labels else { bail!("{} has no labels", d.source) };
            let acc = m.accuracy(&d.images, l)?;
            println!("accuracy {:.2}% on {} images of {}", 100.0 * acc, d.len(), d.source);
            if *json {
                println!("{}", serde_json::json!({ "accuracy": acc, "images": d.len() }));
            }
            Ok(())
        }
    }
}
