//! Datasets (MNIST IDX, CIFAR-10 binary, image folders, the bundled MNIST subset, `open`) and
//! image files (grids saved as PNG, single images loaded), on synthetic files with known values.

use std::io::Write;
use std::path::{Path, PathBuf};

use orwcfm_fast::data::{self, Dataset, Split};
use orwcfm_fast::io::image as img;
use orwcfm_fast::tensor::Tensor;

/// A test's own folder, removed when the test ends (pass or fail).
struct TmpDir(PathBuf);

impl std::ops::Deref for TmpDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        // The per-process parent goes once the last test's folder is gone.
        if let Some(parent) = self.0.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// A fresh folder for one test: `<tmp>/orwcfm_data_<pid>/<name>`.
fn tmp(name: &str) -> TmpDir {
    let d = std::env::temp_dir().join(format!("orwcfm_data_{}", std::process::id())).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create test folder");
    TmpDir(d)
}

fn write(p: &Path, bytes: &[u8]) {
    std::fs::write(p, bytes).expect("write test file");
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).expect("gzip");
    e.finish().expect("gzip")
}

/// IDX images file bytes: magic 0x803, dims n, h, w, then pixels.
fn idx_images(n: u32, h: u32, w: u32, pixels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, h, w] {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(pixels);
    v
}

/// IDX labels file bytes: magic 0x801, count, then labels.
fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 1];
    v.extend_from_slice(&(labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

fn err_text<T: std::fmt::Debug>(r: anyhow::Result<T>) -> String {
    format!("{:#}", r.expect_err("expected an error"))
}

/// Three 2×2 images with bytes 0, 255, 51, … and labels 0, 9, 3.
const PIX: [u8; 12] = [0, 255, 51, 128, 1, 2, 3, 4, 254, 100, 200, 7];
const LAB: [u8; 3] = [0, 9, 3];

fn check_small_idx(ds: &Dataset) {
    assert_eq!(ds.images.shape(), &[3, 1, 2, 2]);
    assert_eq!(ds.len(), 3);
    assert_eq!(ds.sample_shape(), [1, 2, 2]);
    let d = ds.images.data();
    assert_eq!(d[0], -1.0);
    assert_eq!(d[1], 1.0);
    assert_eq!(d[2], 51.0f32 / 127.5 - 1.0);
    assert!((d[2] - (-0.6)).abs() < 1e-6);
    assert_eq!(d[3], 128.0f32 / 127.5 - 1.0);
    assert_eq!(d[8], 254.0f32 / 127.5 - 1.0);
    assert_eq!(ds.labels.as_deref(), Some(&[0usize, 9, 3][..]));
    assert_eq!(ds.num_classes, Some(10));
}

#[test]
fn idx_plain_and_gzip_round_trip() {
    let d = tmp("idx_round_trip");
    let (ip, lp) = (d.join("x-images-idx3-ubyte"), d.join("x-labels-idx1-ubyte"));
    write(&ip, &idx_images(3, 2, 2, &PIX));
    write(&lp, &idx_labels(&LAB));
    check_small_idx(&data::load_mnist_idx(&ip, Some(&lp)).expect("plain IDX"));

    // Gzip is recognised by content, not by name: these files have no .gz extension.
    let (gi, gl) = (d.join("g-images-idx3-ubyte"), d.join("g-labels-idx1-ubyte.gz"));
    write(&gi, &gzip(&idx_images(3, 2, 2, &PIX)));
    write(&gl, &gzip(&idx_labels(&LAB)));
    check_small_idx(&data::load_mnist_idx(&gi, Some(&gl)).expect("gzip IDX"));

    // Without labels; non-square sizes.
    let ns = d.join("ns-images-idx3-ubyte");
    write(&ns, &idx_images(2, 2, 3, &PIX));
    let ds = data::load_mnist_idx(&ns, None).expect("unlabelled IDX");
    assert_eq!(ds.images.shape(), &[2, 1, 2, 3]);
    assert_eq!(ds.labels, None);
    assert_eq!(ds.num_classes, None);
    assert_eq!(ds.images.data()[5], 2.0f32 / 127.5 - 1.0);

    // `open` on the images file finds the labels beside it.
    let ds = data::open(gi.to_str().expect("utf-8 path")).expect("open IDX file");
    check_small_idx(&ds);
}

#[test]
fn idx_errors_name_the_file() {
    let d = tmp("idx_errors");
    let lp = d.join("ok-labels-idx1-ubyte");
    write(&lp, &idx_labels(&LAB));

    let trunc = d.join("trunc-images-idx3-ubyte");
    write(&trunc, &idx_images(3, 2, 2, &PIX[..11]));
    let e = err_text(data::load_mnist_idx(&trunc, None));
    assert!(e.contains("trunc-images-idx3-ubyte") && e.contains("truncated") && e.contains("28"), "{e}");

    let trail = d.join("trail-images-idx3-ubyte");
    let mut b = idx_images(3, 2, 2, &PIX);
    b.push(9);
    write(&trail, &gzip(&b));
    let e = err_text(data::load_mnist_idx(&trail, None));
    assert!(e.contains("trail-images-idx3-ubyte") && e.contains("trailing") && e.contains("expected 28"), "{e}");

    let magic = d.join("magic-images-idx3-ubyte");
    let mut b = idx_images(3, 2, 2, &PIX);
    b[3] = 4;
    write(&magic, &b);
    let e = err_text(data::load_mnist_idx(&magic, None));
    assert!(e.contains("magic-images-idx3-ubyte") && e.contains("0x00000804") && e.contains("0x00000803"), "{e}");

    // A labels file given as images.
    let e = err_text(data::load_mnist_idx(&lp, None));
    assert!(e.contains("ok-labels-idx1-ubyte") && e.contains("labels file"), "{e}");

    let two = d.join("two-images-idx3-ubyte");
    write(&two, &idx_images(2, 2, 2, &PIX[..8]));
    let e = err_text(data::load_mnist_idx(&two, Some(&lp)));
    assert!(e.contains("ok-labels-idx1-ubyte") && e.contains("3 labels") && e.contains("2 images"), "{e}");

    let ok = d.join("ok-images-idx3-ubyte");
    write(&ok, &idx_images(3, 2, 2, &PIX));
    let bad = d.join("bad-labels-idx1-ubyte");
    write(&bad, &idx_labels(&[0, 10, 1]));
    let e = err_text(data::load_mnist_idx(&ok, Some(&bad)));
    assert!(e.contains("bad-labels-idx1-ubyte") && e.contains("label 1 is 10"), "{e}");

    let corrupt = d.join("corrupt-images-idx3-ubyte.gz");
    let mut g = gzip(&idx_images(3, 2, 2, &PIX));
    let n = g.len();
    g.truncate(n - 12);
    write(&corrupt, &g);
    let e = err_text(data::load_mnist_idx(&corrupt, None));
    assert!(e.contains("corrupt-images-idx3-ubyte.gz") && e.contains("gzip"), "{e}");
}

/// A CIFAR record: label, then pixel byte `(c*50 + y + 3x + 7k) % 256` at (c, y, x).
fn cifar_record(k: usize, label: u8) -> Vec<u8> {
    let mut v = vec![label];
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                v.push(((c * 50 + y + 3 * x + 7 * k) % 256) as u8);
            }
        }
    }
    v
}

fn cifar_pixel(ds: &Dataset, n: usize, c: usize, y: usize, x: usize) -> f32 {
    ds.images.data()[((n * 3 + c) * 32 + y) * 32 + x]
}

#[test]
fn cifar_file_is_channel_major() {
    let d = tmp("cifar_file");
    let f = d.join("data_batch_1.bin");
    let bytes: Vec<u8> = [(0, 6u8), (1, 0), (2, 9)].iter().flat_map(|&(k, l)| cifar_record(k, l)).collect();
    assert_eq!(bytes.len(), 3 * 3073);
    write(&f, &bytes);
    let ds = data::load_cifar10(&f).expect("CIFAR file");
    assert_eq!(ds.images.shape(), &[3, 3, 32, 32]);
    assert_eq!(ds.labels.as_deref(), Some(&[6usize, 0, 9][..]));
    assert_eq!(ds.num_classes, Some(10));
    // Record 1, green (c=1), row 2, column 5: byte 50 + 2 + 15 + 7 = 74.
    assert_eq!(cifar_pixel(&ds, 1, 1, 2, 5), 74.0f32 / 127.5 - 1.0);
    // Record 2, blue, row 31, column 31: (100 + 31 + 93 + 14) % 256 = 238.
    assert_eq!(cifar_pixel(&ds, 2, 2, 31, 31), 238.0f32 / 127.5 - 1.0);
    // Record 0, red, origin: byte 0.
    assert_eq!(cifar_pixel(&ds, 0, 0, 0, 0), -1.0);
    // The same through `open`.
    let ds2 = data::open(f.to_str().expect("utf-8 path")).expect("open CIFAR file");
    assert_eq!(cifar_pixel(&ds2, 1, 1, 2, 5), 74.0f32 / 127.5 - 1.0);
}

#[test]
fn cifar_folder_concatenates_batches() {
    let d = tmp("cifar_folder");
    write(&d.join("data_batch_1.bin"), &[cifar_record(0, 3), cifar_record(1, 4)].concat());
    write(&d.join("data_batch_2.bin"), &cifar_record(2, 5));
    write(&d.join("test_batch.bin"), &cifar_record(3, 8));
    let ds = data::load_cifar10(&d).expect("CIFAR folder");
    assert_eq!(ds.images.shape(), &[3, 3, 32, 32]);
    assert_eq!(ds.labels.as_deref(), Some(&[3usize, 4, 5][..]));
    // Third image comes from data_batch_2 (k = 2): red (y=0, x=1) → 0 + 3 + 14 = 17.
    assert_eq!(cifar_pixel(&ds, 2, 0, 0, 1), 17.0f32 / 127.5 - 1.0);

    let ds = data::open(d.to_str().expect("utf-8 path")).expect("open CIFAR folder");
    assert_eq!(ds.labels.as_deref(), Some(&[3usize, 4, 5][..]));
    let ds = data::open(&format!("{}:test", d.display())).expect("open CIFAR folder :test");
    assert_eq!(ds.labels.as_deref(), Some(&[8usize][..]));

    let empty = tmp("cifar_empty");
    let e = err_text(data::load_cifar10(&empty));
    assert!(e.contains("cifar_empty") && e.contains("data_batch_1.bin"), "{e}");
}

#[test]
fn cifar_bad_length_and_label_fail() {
    let d = tmp("cifar_bad");
    let f = d.join("data_batch_1.bin");
    let mut b = [cifar_record(0, 1), cifar_record(1, 2)].concat();
    b.extend_from_slice(&[0; 5]);
    write(&f, &b);
    let e = err_text(data::load_cifar10(&f));
    assert!(e.contains("data_batch_1.bin") && e.contains("6151 bytes") && e.contains("3073"), "{e}");

    let g = d.join("test_batch.bin");
    write(&g, &[cifar_record(0, 1), cifar_record(1, 12)].concat());
    let e = err_text(data::load_cifar10(&g));
    assert!(e.contains("test_batch.bin") && e.contains("label 12"), "{e}");
}

fn save_gray(p: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> u8) {
    image::GrayImage::from_fn(w, h, |x, y| image::Luma([f(x, y)])).save(p).expect("save PNG");
}

#[test]
fn image_folder_classes_and_colour() {
    let d = tmp("folder_classes");
    std::fs::create_dir_all(d.join("cats")).expect("mkdir");
    std::fs::create_dir_all(d.join("dogs")).expect("mkdir");
    std::fs::create_dir_all(d.join("empty")).expect("mkdir");
    save_gray(&d.join("dogs/z.png"), 4, 3, |x, y| (10 * x + y) as u8);
    save_gray(&d.join("cats/b.PNG"), 4, 3, |_, _| 255);
    save_gray(&d.join("cats/a.png"), 4, 3, |x, _| if x == 1 { 51 } else { 0 });
    write(&d.join("cats/notes.txt"), b"not an image");

    let ds = data::load_image_folder(&d).expect("gray folder");
    assert_eq!(ds.images.shape(), &[3, 1, 3, 4]);
    assert_eq!(ds.labels.as_deref(), Some(&[0usize, 0, 1][..]));
    assert_eq!(ds.num_classes, Some(2));
    let px = ds.images.data();
    // Sorted: cats/a.png, cats/b.PNG, dogs/z.png.
    assert_eq!(px[1], 51.0f32 / 127.5 - 1.0);
    assert_eq!(px[0], -1.0);
    assert_eq!(px[12], 1.0);
    // dogs/z.png at (x=3, y=2): 32.
    assert_eq!(px[24 + 2 * 4 + 3], 32.0f32 / 127.5 - 1.0);

    // A colour JPEG makes every image RGB; gray images are replicated over the channels.
    image::RgbImage::from_fn(4, 3, |_, _| image::Rgb([250, 10, 10])).save(d.join("dogs/c.JPG")).expect("save JPEG");
    let ds = data::open(d.to_str().expect("utf-8 path")).expect("colour folder");
    assert_eq!(ds.images.shape(), &[4, 3, 3, 4]);
    assert_eq!(ds.labels.as_deref(), Some(&[0usize, 0, 1, 1][..]));
    let px = ds.images.data();
    for c in 0..3 {
        assert_eq!(px[c * 12 + 1], 51.0f32 / 127.5 - 1.0, "channel {c}");
    }
    // dogs/c.JPG (index 2): mostly red, lossy.
    let (r, g) = (px[2 * 36], px[2 * 36 + 12]);
    assert!(r > 0.8 && g < -0.7, "JPEG red {r} green {g}");

    // Flat folder: no labels.
    let flat = tmp("folder_flat");
    save_gray(&flat.join("1.png"), 2, 2, |_, _| 0);
    save_gray(&flat.join("2.png"), 2, 2, |_, _| 255);
    let ds = data::load_image_folder(&flat).expect("flat folder");
    assert_eq!(ds.images.shape(), &[2, 1, 2, 2]);
    assert_eq!(ds.labels, None);
    assert_eq!(ds.num_classes, None);
    assert_eq!(ds.images.data()[4], 1.0);
}

#[test]
fn image_folder_size_mismatch_names_both() {
    let d = tmp("folder_sizes");
    save_gray(&d.join("a.png"), 4, 3, |_, _| 0);
    save_gray(&d.join("b.png"), 5, 3, |_, _| 0);
    let e = err_text(data::load_image_folder(&d));
    assert!(e.contains("4×3") && e.contains("5×3") && e.contains("a.png") && e.contains("b.png"), "{e}");

    let none = tmp("folder_none");
    let e = err_text(data::load_image_folder(&none));
    assert!(e.contains("folder_none") && e.contains("no .png"), "{e}");
}

fn digit_counts(ds: &Dataset) -> Vec<usize> {
    let mut c = vec![0; 10];
    for &l in ds.labels.as_ref().expect("labels") {
        c[l] += 1;
    }
    c
}

#[test]
fn bundled_mnist_subset() {
    let tr = data::bundled_mnist(Split::Train).expect("train");
    assert_eq!(tr.images.shape(), &[4500, 1, 28, 28]);
    assert_eq!(tr.sample_shape(), [1, 28, 28]);
    assert_eq!(digit_counts(&tr), vec![450; 10]);
    assert_eq!(tr.num_classes, Some(10));
    assert_eq!(tr.source, "bundled MNIST 5k subset (train)");
    let (mn, mx) = tr.images.data().iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!((mn, mx), (-1.0, 1.0));

    let ho = data::open("mnist5k:heldout").expect("heldout");
    assert_eq!(ho.images.shape(), &[500, 1, 28, 28]);
    assert_eq!(digit_counts(&ho), vec![50; 10]);
    let (mn, mx) = ho.images.data().iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert_eq!((mn, mx), (-1.0, 1.0));
    assert_eq!(data::open("mnist5k").expect("mnist5k").len(), 4500);
    let e = err_text(data::open("mnist5k:test"));
    assert!(e.contains("mnist5k:heldout"), "{e}");
}

#[test]
fn batch_and_subset() {
    let d = tmp("batch");
    let (ip, lp) = (d.join("images-idx3-ubyte"), d.join("labels-idx1-ubyte"));
    write(&ip, &idx_images(3, 2, 2, &PIX));
    write(&lp, &idx_labels(&LAB));
    let ds = data::load_mnist_idx(&ip, Some(&lp)).expect("IDX");
    let (x, y) = ds.batch(&[2, 0, 2]);
    assert_eq!(x.shape(), &[3, 1, 2, 2]);
    assert_eq!(y.as_deref(), Some(&[3usize, 0, 3][..]));
    assert_eq!(x.data()[0], 254.0f32 / 127.5 - 1.0);
    assert_eq!(x.data()[4], -1.0);
    let s = ds.subset(2);
    assert_eq!(s.images.shape(), &[2, 1, 2, 2]);
    assert_eq!(s.labels.as_deref(), Some(&[0usize, 9][..]));
    assert_eq!(s.images.data()[7], 4.0f32 / 127.5 - 1.0);
    assert_eq!(ds.subset(10).len(), 3);
    assert!(!ds.is_empty());
}

#[test]
fn to_u8_matches_save_image() {
    assert_eq!(img::to_u8(-1.0), 0);
    assert_eq!(img::to_u8(1.0), 255);
    assert_eq!(img::to_u8(0.0), 128); // 127.5 + 0.5
    assert_eq!(img::to_u8(0.5), 191); // 191.25 + 0.5 = 191.75
    assert_eq!(img::to_u8(5.0), 255);
    assert_eq!(img::to_u8(-5.0), 0);
    assert_eq!(img::to_u8(f32::NAN), 0);
    assert_eq!(img::to_u8_vec(&[-1.0, 0.2]), vec![0, 153]); // 0.6·255 + 0.5 = 153.5
}

#[test]
fn grid_png_layout_and_pixels() {
    let d = tmp("grid");
    // Five 1×4×4 images, image k filled with value -1 + 0.4k.
    let vals: Vec<f32> = (0..5).flat_map(|k| vec![-1.0 + 0.4 * k as f32; 16]).collect();
    let x = Tensor::from_vec(vals, &[5, 1, 4, 4]);
    let (_, w, h, c) = img::grid(&x, 3, 2);
    assert_eq!((w, h, c), (20, 14, 1));
    let p = d.join("grid.png");
    img::save_grid(&p, &x, 3).expect("save grid");
    let back = image::open(&p).expect("read grid");
    assert_eq!(back.color(), image::ColorType::L8);
    let g = back.to_luma8();
    assert_eq!((g.width(), g.height()), (20, 14));
    assert_eq!(g.get_pixel(0, 0)[0], 0); // padding
    assert_eq!(g.get_pixel(2, 2)[0], 0); // image 0: -1
    // Image 4 (row 1, column 1) starts at (2 + 6, 2 + 6); value 0.6 → (0.8·255 + 0.5) = 204.5 → 204.
    assert_eq!(g.get_pixel(8, 8)[0], 204);
    assert_eq!(g.get_pixel(11, 11)[0], 204);
    assert_eq!(g.get_pixel(12, 11)[0], 0); // padding after image 4
    // Image 2 (row 0, column 2) at (14, 2): value -0.2 → 0.4·255 + 0.5 = 102.5 → 102.
    assert_eq!(g.get_pixel(14, 2)[0], 102);
    assert_eq!(g.get_pixel(15, 9)[0], 0); // the empty sixth slot stays black

    // RGB: channel order survives.
    let mut rgb = vec![-1.0f32; 2 * 3 * 4];
    rgb[4..8].fill(1.0); // image 0, green
    rgb[12 + 8..12 + 12].fill(1.0); // image 1, blue
    let x = Tensor::from_vec(rgb, &[2, 3, 2, 2]);
    let p = d.join("rgb.png");
    img::save_grid(&p, &x, 8).expect("save RGB grid");
    let back = image::open(&p).expect("read RGB grid");
    assert_eq!(back.color(), image::ColorType::Rgb8);
    let g = back.to_rgb8();
    assert_eq!((g.width(), g.height()), (2 * 4 + 2, 6));
    assert_eq!(g.get_pixel(2, 2).0, [0, 255, 0]);
    assert_eq!(g.get_pixel(6, 3).0, [0, 0, 255]);

    let e = err_text(img::save_grid(&d.join("no/such/folder/g.png"), &x, 8));
    assert!(e.contains("no/such/folder") && e.contains("does not exist"), "{e}");
    let e = err_text(img::save_grid(&d.join("g.jpg"), &x, 8));
    assert!(e.contains("g.jpg") && e.contains(".png"), "{e}");
    let e = err_text(img::save_grid(&d.join("g.png"), &Tensor::zeros(&[1, 2, 2, 2]), 8));
    assert!(e.contains("2 channels"), "{e}");
}

#[test]
fn load_image_gray_and_rgb() {
    let d = tmp("load_image");
    save_gray(&d.join("g.png"), 3, 2, |x, y| (x * 100 + y) as u8);
    let t = img::load_image(&d.join("g.png")).expect("gray");
    assert_eq!(t.shape(), &[1, 2, 3]);
    assert_eq!(t.data()[4], 101.0f32 / 127.5 - 1.0); // (y=1, x=1)
    image::RgbImage::from_fn(2, 2, |x, y| image::Rgb([x as u8 * 255, y as u8 * 51, 7])).save(d.join("c.png")).expect("save");
    let t = img::load_image(&d.join("c.png")).expect("rgb");
    assert_eq!(t.shape(), &[3, 2, 2]);
    assert_eq!(t.data()[1], 1.0); // red at (0, 1)
    assert_eq!(t.data()[4 + 2], 51.0f32 / 127.5 - 1.0); // green at (1, 0)
    assert_eq!(t.data()[8 + 3], 7.0f32 / 127.5 - 1.0); // blue at (1, 1)
    let e = err_text(img::load_image(&d.join("missing.png")));
    assert!(e.contains("missing.png"), "{e}");
}

#[test]
fn open_dispatch_and_errors() {
    let e = err_text(data::open("does/not/exist"));
    assert_eq!(e, "dataset does/not/exist not found");

    // A folder of MNIST files (torchvision's names), train and :test.
    let d = tmp("open_mnist");
    write(&d.join("train-images-idx3-ubyte.gz"), &gzip(&idx_images(3, 2, 2, &PIX)));
    write(&d.join("train-labels-idx1-ubyte.gz"), &gzip(&idx_labels(&LAB)));
    write(&d.join("t10k-images-idx3-ubyte"), &idx_images(1, 2, 2, &PIX[..4]));
    write(&d.join("t10k-labels-idx1-ubyte"), &idx_labels(&[7]));
    let ds = data::open(d.to_str().expect("utf-8 path")).expect("MNIST folder");
    check_small_idx(&ds);
    let ds = data::open(&format!("{}:test", d.display())).expect("MNIST folder :test");
    assert_eq!(ds.images.shape(), &[1, 1, 2, 2]);
    assert_eq!(ds.labels.as_deref(), Some(&[7usize][..]));

    // A labels file, a foreign file.
    let e = err_text(data::open(d.join("t10k-labels-idx1-ubyte").to_str().expect("utf-8")));
    assert!(e.contains("t10k-labels-idx1-ubyte") && e.contains("labels file"), "{e}");
    let junk = d.join("junk.dat");
    write(&junk, b"hello world, not a dataset");
    let e = err_text(data::open(junk.to_str().expect("utf-8")));
    assert!(e.contains("junk.dat") && e.contains("cannot tell"), "{e}");
}
