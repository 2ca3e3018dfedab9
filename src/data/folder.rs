//! Folders of PNG/JPEG images, optionally sorted into one subfolder per class (the layout of
//! torchvision's `ImageFolder`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::DynamicImage;
use rayon::prelude::*;

use super::{Dataset, byte_to_unit};
use crate::tensor::Tensor;

/// Whether a path names a PNG or JPEG file by its extension (`.png`, `.jpg`, `.jpeg`, any case).
pub(crate) fn is_image_name(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| ["png", "jpg", "jpeg"].iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Whether a file name starts with a dot (hidden files, macOS `._*` companions).
fn is_hidden(p: &Path) -> bool {
    p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'))
}

/// The entries of a folder, sorted by path.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        v.push(e.path());
    }
    v.sort();
    Ok(v)
}

/// The image files directly in a folder, sorted by path.
fn image_files(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(sorted_entries(dir)?.into_iter().filter(|p| !is_hidden(p) && p.is_file() && is_image_name(p)).collect())
}

/// Decode one image file (format found from its content, not its extension).
pub(crate) fn decode(path: &Path) -> Result<DynamicImage> {
    image::ImageReader::open(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("cannot read {}", path.display()))?
        .decode()
        .with_context(|| format!("cannot decode image {}", path.display()))
}

/// Load every `.png` / `.jpg` / `.jpeg` file (any case; hidden files skipped) of a folder,
/// sorted by path, as `[N, C, H, W]` in `[-1, 1]`.
///
/// - Grayscale images give C = 1, colour images C = 3; when both kinds are present all are
///   converted to RGB (grayscale replicated). Alpha channels are dropped.
/// - All images must have one size; otherwise the error names both sizes and both files.
/// - When the images sit in subfolders (one level deep), the subfolder names, sorted, are the
///   classes 0..K (subfolders without images are ignored); images directly in the folder then
///   are an error. Without subfolders the labels are `None`.
pub fn load_image_folder(dir: &Path) -> Result<Dataset> {
    if !dir.is_dir() {
        bail!("image folder {} not found (or not a folder)", dir.display());
    }
    let top = image_files(dir)?;
    let mut classes: Vec<(String, Vec<PathBuf>)> = Vec::new();
    for sub in sorted_entries(dir)?.into_iter().filter(|p| p.is_dir() && !is_hidden(p)) {
        let files = image_files(&sub)?;
        if !files.is_empty() {
            let name = sub.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            classes.push((name, files));
        }
    }
    if !top.is_empty() && !classes.is_empty() {
        bail!(
            "{} mixes images directly in the folder ({} …) with class subfolders ({} …): put all \
             images in class subfolders, or none",
            dir.display(),
            top[0].display(),
            classes[0].0
        );
    }
    let items: Vec<(PathBuf, Option<usize>)> =
        if classes.is_empty() { top.into_iter().map(|p| (p, None)).collect() } else { classes.iter().enumerate().flat_map(|(k, (_, fs))| fs.iter().map(move |p| (p.clone(), Some(k)))).collect() };
    if items.is_empty() {
        bail!("{} holds no .png, .jpg or .jpeg images (neither directly nor in class subfolders)", dir.display());
    }

    let decoded: Vec<DynamicImage> = items.par_iter().map(|(p, _)| decode(p)).collect::<Result<_>>()?;
    let (w0, h0) = (decoded[0].width(), decoded[0].height());
    for (img, (p, _)) in decoded.iter().zip(&items) {
        if (img.width(), img.height()) != (w0, h0) {
            bail!(
                "images in {} differ in size: {} is {w0}×{h0} (width×height) but {} is {}×{}; all \
                 images of a dataset must have one size",
                dir.display(),
                items[0].0.display(),
                p.display(),
                img.width(),
                img.height()
            );
        }
    }
    let colour = decoded.iter().any(|im| im.color().has_color());
    let c = if colour { 3 } else { 1 };
    let (h, w) = (h0 as usize, w0 as usize);
    let per = c * h * w;
    let mut pixels = vec![0f32; items.len() * per];
    pixels.par_chunks_mut(per).zip(decoded.par_iter()).for_each(|(out, img)| {
        if colour {
            let rgb = img.to_rgb8();
            for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
                for ch in 0..3 {
                    out[ch * h * w + i] = byte_to_unit(px[ch]);
                }
            }
        } else {
            let l = img.to_luma8();
            for (o, &v) in out.iter_mut().zip(l.as_raw()) {
                *o = byte_to_unit(v);
            }
        }
    });
    let n = items.len();
    let (labels, num_classes, source) = if classes.is_empty() {
        (None, None, format!("image folder {} ({n} images)", dir.display()))
    } else {
        let names: Vec<&str> = classes.iter().map(|(s, _)| s.as_str()).collect();
        let shown = if names.len() > 12 { format!("{}, …", names[..12].join(", ")) } else { names.join(", ") };
        (Some(items.iter().map(|(_, l)| l.unwrap_or(0)).collect()), Some(classes.len()), format!("image folder {} ({n} images, {} classes: {shown})", dir.display(), classes.len()))
    };
    Ok(Dataset { images: Tensor::from_vec(pixels, &[n, c, h, w]), labels, num_classes, source })
}
