//! CIFAR-10, binary version (`cifar-10-binary.tar.gz`).
//!
//! Each batch file (`data_batch_1.bin` … `data_batch_5.bin`, `test_batch.bin`) is a run of
//! 3073-byte records: one label byte (0..=9), then 3072 pixel bytes, channel-major: the 1024 red
//! values of the 32×32 image row by row, then the green, then the blue.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::{Dataset, byte_to_unit};
use crate::tensor::Tensor;

/// Side of a CIFAR-10 image.
const SIDE: usize = 32;
/// Pixel bytes of one image (3 × 32 × 32).
const PIXELS: usize = 3 * SIDE * SIDE;
/// Bytes of one record: a label byte and the pixels.
const RECORD: usize = 1 + PIXELS;
/// Number of classes.
const CLASSES: usize = 10;

/// Load CIFAR-10 (binary version): either one batch file (`data_batch_N.bin`, `test_batch.bin`)
/// or a folder holding `data_batch_1.bin` … `data_batch_5.bin` (the training set; the batches
/// present are read in order, and it is an error when there is none). A folder that holds the
/// extracted `cifar-10-batches-bin/` is also accepted.
///
/// Images are `[N, 3, 32, 32]` in `[-1, 1]`, with labels 0..=9 (`num_classes` 10). A file whose
/// size is not a non-zero multiple of 3073 bytes, or with a label byte above 9, is an error
/// naming it.
pub fn load_cifar10(path: &Path) -> Result<Dataset> {
    if path.is_dir() {
        match find_batches_in_folder(path, false)? {
            Some(files) => load_cifar10_files(&files, path),
            None => bail!("{} holds no CIFAR-10 training batches: expected data_batch_1.bin … data_batch_5.bin", path.display()),
        }
    } else if path.is_file() {
        load_cifar10_files(&[path.to_path_buf()], path)
    } else {
        bail!("CIFAR-10 data {} not found", path.display())
    }
}

/// The CIFAR-10 batch files in `dir` (or in `dir/cifar-10-batches-bin`): `data_batch_1..5.bin`
/// in order, or `test_batch.bin` when `test`. `None` when the folder holds no `.bin` batch at
/// all; an error when it holds CIFAR batches but not the ones asked for.
pub(crate) fn find_batches_in_folder(dir: &Path, test: bool) -> Result<Option<Vec<PathBuf>>> {
    for d in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        if !d.is_dir() {
            continue;
        }
        let train: Vec<PathBuf> = (1..=5).map(|i| d.join(format!("data_batch_{i}.bin"))).filter(|p| p.is_file()).collect();
        let test_file = d.join("test_batch.bin");
        if test {
            if test_file.is_file() {
                return Ok(Some(vec![test_file]));
            }
            if !train.is_empty() {
                bail!("{} holds CIFAR-10 training batches but no test_batch.bin for the :test split", d.display());
            }
        } else {
            if !train.is_empty() {
                return Ok(Some(train));
            }
            if test_file.is_file() {
                bail!(
                    "{} holds only the CIFAR-10 test batch (test_batch.bin), no data_batch_1.bin … \
                     data_batch_5.bin; give {} or add :test to read it",
                    d.display(),
                    test_file.display()
                );
            }
        }
    }
    // Other `.bin` files: the folder looks like CIFAR but with unexpected names.
    let has_bin =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?.filter_map(|e| e.ok()).any(|e| e.path().is_file() && e.path().extension().is_some_and(|x| x.eq_ignore_ascii_case("bin")));
    if has_bin {
        bail!(
            "{} holds .bin files but none named like CIFAR-10 batches \
             (data_batch_1.bin … data_batch_5.bin, test_batch.bin)",
            dir.display()
        );
    }
    Ok(None)
}

/// Read and concatenate CIFAR-10 batch files; `origin` is what the user named (for `source`).
pub(crate) fn load_cifar10_files(files: &[PathBuf], origin: &Path) -> Result<Dataset> {
    let mut pixels: Vec<f32> = Vec::new();
    let mut labels: Vec<usize> = Vec::new();
    for f in files {
        let bytes = std::fs::read(f).with_context(|| format!("cannot read {}", f.display()))?;
        if bytes.is_empty() || bytes.len() % RECORD != 0 {
            bail!(
                "{} is not a CIFAR-10 binary batch: {} bytes, expected a non-zero multiple of {RECORD} \
                 (1 label byte + 3×32×32 pixels per image){}",
                f.display(),
                bytes.len(),
                if bytes.len() > RECORD { format!(", i.e. {} or {} bytes", bytes.len() / RECORD * RECORD, (bytes.len() / RECORD + 1) * RECORD) } else { String::new() }
            );
        }
        pixels.reserve(bytes.len() / RECORD * PIXELS);
        for (i, rec) in bytes.chunks_exact(RECORD).enumerate() {
            let label = rec[0] as usize;
            if label >= CLASSES {
                bail!(
                    "{}: record {i} (byte offset {}) has label {label}, expected 0..=9 — not a CIFAR-10 batch \
                     (CIFAR-100 files have 2 label bytes per record)",
                    f.display(),
                    i * RECORD
                );
            }
            labels.push(label);
            pixels.extend(rec[1..].iter().map(|&b| byte_to_unit(b)));
        }
    }
    let n = labels.len();
    let names: Vec<String> = files.iter().map(|f| f.file_name().map(|s| s.to_string_lossy().to_string()).unwrap_or_default()).collect();
    let source = if files.len() == 1 && files[0] == origin { format!("CIFAR-10 {}", origin.display()) } else { format!("CIFAR-10 {} ({})", origin.display(), names.join(", ")) };
    Ok(Dataset { images: Tensor::from_vec(pixels, &[n, 3, SIDE, SIDE]), labels: Some(labels), num_classes: Some(CLASSES), source })
}
