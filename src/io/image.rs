//! Image files: image grids saved as PNG (torchvision's `make_grid` + `save_image`) and single
//! images loaded as tensors.
//!
//! Pixels in tensors are in `[-1, 1]` (torchcfm's normalisation); on disk they are bytes. The
//! byte of a value `x` is torchvision's `save_image` of `x / 2 + 0.5`:
//! `clamp((x * 0.5 + 0.5) * 255 + 0.5, 0, 255)` truncated ([`to_u8`]).

use std::io::Cursor;
use std::path::Path;

use anyhow::{Context, Result, bail};
use image::{ExtendedColorType, ImageEncoder};

use crate::tensor::Tensor;

/// One value in `[-1, 1]` to a byte, as torchvision's `save_image` does for `x / 2 + 0.5`:
/// `(x * 0.5 + 0.5) * 255 + 0.5`, clamped to `[0, 255]`, truncated. NaN gives 0.
#[inline]
pub fn to_u8(x: f32) -> u8 {
    ((x * 0.5 + 0.5) * 255.0 + 0.5).clamp(0.0, 255.0) as u8
}

/// [`to_u8`] over a slice.
pub fn to_u8_vec(x: &[f32]) -> Vec<u8> {
    x.iter().map(|&v| to_u8(v)).collect()
}

/// Arrange `x` (`[N, C, H, W]`, values in `[-1, 1]`) in a grid of `nrow` images per row with
/// `pad` black pixels between and around them, as torchvision's
/// `make_grid(x / 2 + 0.5, nrow, padding=pad, pad_value=0)` followed by `save_image`'s
/// conversion to bytes.
///
/// Returns `(pixels, width, height, channels)`, the pixels interleaved row by row
/// (`[height][width][channels]`, ready for an image encoder), `channels = C`. The grid has
/// `min(nrow, N)` columns and `ceil(N / columns)` rows: width `columns * (W + pad) + pad`,
/// height `rows * (H + pad) + pad`. As in torchvision, a single image (`N = 1`) is returned
/// without padding; `N = 0` gives an empty 0×0 grid; `nrow = 0` is taken as 1.
///
/// # Panics
/// If `x` is not 4-dimensional ([`save_grid`] checks this and returns an error instead).
pub fn grid(x: &Tensor, nrow: usize, pad: usize) -> (Vec<u8>, usize, usize, usize) {
    let s = x.shape();
    assert_eq!(s.len(), 4, "image grid: expected [N, C, H, W], got shape {s:?}");
    let (n, c, h, w) = (s[0], s[1], s[2], s[3]);
    if n == 0 {
        return (Vec::new(), 0, 0, c);
    }
    let pad = if n == 1 { 0 } else { pad };
    let cols = nrow.max(1).min(n);
    let rows = n.div_ceil(cols);
    let (gw, gh) = (cols * (w + pad) + pad, rows * (h + pad) + pad);
    let mut out = vec![0u8; gw * gh * c];
    let data = x.data();
    for k in 0..n {
        let (gy, gx) = (k / cols, k % cols);
        let (y0, x0) = (gy * (h + pad) + pad, gx * (w + pad) + pad);
        let img = &data[k * c * h * w..(k + 1) * c * h * w];
        for ch in 0..c {
            for yy in 0..h {
                let src = &img[ch * h * w + yy * w..ch * h * w + (yy + 1) * w];
                let row = ((y0 + yy) * gw + x0) * c + ch;
                for (xx, &v) in src.iter().enumerate() {
                    out[row + xx * c] = to_u8(v);
                }
            }
        }
    }
    (out, gw, gh, c)
}

/// Save `x` (`[N, C, H, W]` in `[-1, 1]`, C = 1 or 3) as a PNG grid of `nrow` images per row
/// with 2-pixel black padding (torchvision's `save_image(x / 2 + 0.5, path, nrow=nrow)`; see
/// [`grid`]). C = 1 gives a grayscale PNG, C = 3 an RGB one. The file is encoded in memory and
/// written atomically; the folder must exist and the extension must be `.png`.
pub fn save_grid(path: &Path, x: &Tensor, nrow: usize) -> Result<()> {
    if !path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
        bail!("cannot save image grid {}: the file name must end in .png", path.display());
    }
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !dir.is_dir() {
        bail!("cannot save image grid {}: folder {} does not exist", path.display(), dir.display());
    }
    let s = x.shape();
    if s.len() != 4 {
        bail!("cannot save image grid {}: expected images [N, C, H, W], got shape {s:?}", path.display());
    }
    if s.contains(&0) {
        bail!("cannot save image grid {}: no pixels to save (shape {s:?})", path.display());
    }
    let colour = match s[1] {
        1 => ExtendedColorType::L8,
        3 => ExtendedColorType::Rgb8,
        c => bail!("cannot save image grid {}: {c} channels, expected 1 (grayscale) or 3 (RGB)", path.display()),
    };
    let (pixels, w, h, _) = grid(x, nrow, 2);
    let (w32, h32) =
        (u32::try_from(w).with_context(|| format!("image grid {} is too wide ({w} pixels)", path.display()))?, u32::try_from(h).with_context(|| format!("image grid {} is too tall ({h} pixels)", path.display()))?);
    let mut bytes = Vec::new();
    image::codecs::png::PngEncoder::new(Cursor::new(&mut bytes)).write_image(&pixels, w32, h32, colour).with_context(|| format!("cannot encode image grid {} ({w}×{h})", path.display()))?;
    crate::io::safetensors::write_atomic(path, &bytes)
}

/// Load one PNG or JPEG image (format found from the content) as `[C, H, W]` in `[-1, 1]`:
/// C = 1 for a grayscale image, 3 otherwise (alpha dropped). Each byte `v` becomes
/// `v / 127.5 - 1`, as torchvision's `ToTensor()` + `Normalize((0.5,), (0.5,))`.
pub fn load_image(path: &Path) -> Result<Tensor> {
    if !path.is_file() {
        bail!("image {} not found", path.display());
    }
    let img = crate::data::folder::decode(path)?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    if img.color().has_color() {
        let rgb = img.to_rgb8();
        let mut out = vec![0f32; 3 * h * w];
        for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
            for ch in 0..3 {
                out[ch * h * w + i] = crate::data::byte_to_unit(px[ch]);
            }
        }
        Ok(Tensor::from_vec(out, &[3, h, w]))
    } else {
        let l = img.to_luma8();
        Ok(Tensor::from_vec(crate::data::bytes_to_unit(l.as_raw()), &[1, h, w]))
    }
}
