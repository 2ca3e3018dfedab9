//! Datasets: MNIST (IDX files, plain or gzip, and a bundled 5k subset), CIFAR-10 (binary
//! version) and folders of PNG/JPEG images.
//!
//! Every loader returns a [`Dataset`] whose images are one `[N, C, H, W]` tensor with pixels in
//! `[-1, 1]`, mapped exactly as torchvision's `ToTensor()` followed by
//! `Normalize((0.5,), (0.5,))` (what torchcfm's MNIST and CIFAR-10 examples use): a byte `v`
//! becomes `v / 127.5 - 1` (see [`byte_to_unit`]).
//!
//! [`open`] picks the loader from a command-line spec (`mnist5k`, a path to IDX files, a CIFAR-10
//! `.bin` file or folder, or a folder of images).
//!
//! Submodules: [`mnist`] (IDX format and the bundled subset), [`cifar`] (CIFAR-10 binary
//! batches), [`folder`] (folders of images).

pub mod cifar;
pub mod folder;
pub mod mnist;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

use crate::tensor::Tensor;

pub use cifar::load_cifar10;
pub use folder::load_image_folder;
pub use mnist::{Split, bundled_mnist, load_mnist_idx};

/// A labelled (or unlabelled) image dataset held in memory.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// All images, `[N, C, H, W]`, pixels in `[-1, 1]`.
    pub images: Tensor,
    /// One class index per image (`< num_classes`), when the source has labels.
    pub labels: Option<Vec<usize>>,
    /// How many classes the labels range over (10 for MNIST and CIFAR-10, the number of class
    /// folders for an image folder); `None` without labels.
    pub num_classes: Option<usize>,
    /// Where the data came from, for logs and reports (e.g. `bundled MNIST 5k subset (train)`).
    pub source: String,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.images.shape().first().copied().unwrap_or(0)
    }

    /// Whether the dataset holds no image.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Shape of one image, `[C, H, W]`.
    pub fn sample_shape(&self) -> [usize; 3] {
        let s = self.images.shape();
        [s[1], s[2], s[3]]
    }

    /// The images at `idx` (in that order, repeats allowed) as one `[idx.len(), C, H, W]` tensor,
    /// with their labels when the dataset has labels.
    ///
    /// # Panics
    /// If an index is `>= len()` (indices come from the program's own sampler, not from users).
    pub fn batch(&self, idx: &[usize]) -> (Tensor, Option<Vec<usize>>) {
        let [c, h, w] = self.sample_shape();
        let per = c * h * w;
        let n = self.len();
        let src = self.images.data();
        let mut out = Vec::with_capacity(idx.len() * per);
        for &i in idx {
            assert!(i < n, "Dataset::batch: index {i} out of range for {n} images ({})", self.source);
            out.extend_from_slice(&src[i * per..(i + 1) * per]);
        }
        let labels = self.labels.as_ref().map(|l| idx.iter().map(|&i| l[i]).collect());
        (Tensor::from_vec(out, &[idx.len(), c, h, w]), labels)
    }

    /// The first `n` images (all of them when `n >= len()`), with their labels.
    pub fn subset(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        let [c, h, w] = self.sample_shape();
        let per = c * h * w;
        let images = Tensor::from_vec(self.images.data()[..n * per].to_vec(), &[n, c, h, w]);
        let source = if n == self.len() { self.source.clone() } else { format!("{} (first {n} of {})", self.source, self.len()) };
        Dataset { images, labels: self.labels.as_ref().map(|l| l[..n].to_vec()), num_classes: self.num_classes, source }
    }
}

/// A pixel byte mapped to `[-1, 1]` exactly as `ToTensor()` + `Normalize((0.5,), (0.5,))`:
/// `v / 127.5 - 1` (0 → −1, 255 → 1).
#[inline]
pub fn byte_to_unit(v: u8) -> f32 {
    v as f32 / 127.5 - 1.0
}

/// [`byte_to_unit`] over a slice.
pub fn bytes_to_unit(v: &[u8]) -> Vec<f32> {
    v.iter().map(|&b| byte_to_unit(b)).collect()
}

/// Which split a `PATH:train` / `PATH:test` spec asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathSplit {
    Default,
    Train,
    Test,
}

/// Open a dataset from a command-line spec:
///
/// - `mnist5k`, `mnist5k:train`, `mnist5k:heldout`: the bundled MNIST subset ([`bundled_mnist`]);
/// - a path to an MNIST IDX images file (plain or gzip); its labels are read from the file of the
///   same name with `images-idx3` replaced by `labels-idx1`, when that file exists;
/// - a folder holding MNIST IDX files (`train-images-idx3-ubyte[.gz]` and its labels, directly or
///   under `raw/` or `MNIST/raw/` as torchvision stores them); `PATH:test` reads `t10k-*`;
/// - a CIFAR-10 binary batch file (`.bin`), or a folder holding `data_batch_N.bin` (or
///   `cifar-10-batches-bin/`); `PATH:test` reads `test_batch.bin`;
/// - any other folder: a folder of PNG/JPEG images ([`load_image_folder`]).
///
/// A path that does not exist gives `dataset <spec> not found`.
pub fn open(spec: &str) -> Result<Dataset> {
    let spec_trim = spec.trim();
    if let Some(rest) = spec_trim.strip_prefix("mnist5k") {
        match rest {
            "" | ":train" => return bundled_mnist(Split::Train),
            ":heldout" => return bundled_mnist(Split::HeldOut),
            _ if rest.starts_with(':') => {
                bail!("unknown split '{}' of the bundled dataset mnist5k: expected mnist5k:train or mnist5k:heldout", &rest[1..])
            }
            _ => {}
        }
    }
    let (path, split) = split_spec(spec_trim);
    if !path.exists() {
        bail!("dataset {spec} not found");
    }
    if path.is_file() {
        if split != PathSplit::Default {
            bail!("dataset {spec}: a split (:train or :test) can only follow a folder, not the file {}", path.display());
        }
        return open_file(&path);
    }
    if let Some((images, labels)) = mnist::find_idx_in_folder(&path, split == PathSplit::Test)? {
        return load_mnist_idx(&images, labels.as_deref());
    }
    if let Some(files) = cifar::find_batches_in_folder(&path, split == PathSplit::Test)? {
        return cifar::load_cifar10_files(&files, &path);
    }
    if split != PathSplit::Default {
        bail!(
            "dataset {spec}: {} holds no MNIST IDX files and no CIFAR-10 .bin batches, so a split \
             (:train or :test) does not apply; give the folder of images without it",
            path.display()
        );
    }
    load_image_folder(&path)
}

/// Separate a trailing `:train` / `:test` from a path, unless the whole spec is itself a path.
fn split_spec(spec: &str) -> (PathBuf, PathSplit) {
    let whole = PathBuf::from(spec);
    if whole.exists() {
        return (whole, PathSplit::Default);
    }
    if let Some(p) = spec.strip_suffix(":test") {
        return (PathBuf::from(p), PathSplit::Test);
    }
    if let Some(p) = spec.strip_suffix(":train") {
        return (PathBuf::from(p), PathSplit::Train);
    }
    (whole, PathSplit::Default)
}

/// Open a single file: an IDX images file or a CIFAR-10 batch.
fn open_file(path: &Path) -> Result<Dataset> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let magic = mnist::peek_magic(path)?;
    match magic {
        Some(mnist::IMAGES_MAGIC) => {
            let labels = mnist::labels_beside(path);
            return load_mnist_idx(path, labels.as_deref());
        }
        Some(mnist::LABELS_MAGIC) => bail!(
            "{} is an MNIST IDX labels file; give the images file (…-images-idx3-ubyte) instead, \
             its labels are found beside it",
            path.display()
        ),
        _ => {}
    }
    if name.to_ascii_lowercase().ends_with(".bin") {
        return load_cifar10(path);
    }
    if folder::is_image_name(path) {
        bail!("{} is a single image; a dataset of images is a folder of them (give the folder)", path.display());
    }
    bail!(
        "cannot tell what dataset {} is: expected an MNIST IDX images file (magic 0x00000803, \
         plain or gzip), a CIFAR-10 .bin batch, or a folder (MNIST, CIFAR-10 or images)",
        path.display()
    )
}
