//! Tests for the pure-Rust `torch.save` checkpoint reader.
//!
//! Fixtures (tests/fixtures/pt/) come from scripts/make_pt_reader_fixtures.py; every `<name>.pt`
//! with tensors has a `<name>.expected.safetensors` holding the same tensors as contiguous f32,
//! with metadata `{tensor name: stored dtype, "__order__": comma-separated names in file order}`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use orwcfm_fast::io::pt::{PtStateDict, PtTensor, read_pt_state_dict};
use safetensors::SafeTensors;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pt").join(name)
}

fn read(name: &str, key: Option<&str>) -> PtStateDict {
    let p = fixture(name);
    match read_pt_state_dict(&p, key) {
        Ok(sd) => sd,
        Err(e) => panic!("reading {name} failed: {e:#}"),
    }
}

fn read_err(name: &str, key: Option<&str>) -> String {
    match read_pt_state_dict(&fixture(name), key) {
        Ok(sd) => panic!("reading {name} should fail, got keys {:?}", sd.key),
        Err(e) => format!("{e:#}"),
    }
}

/// (names in file order, name -> expected tensor)
fn expected(name: &str) -> (Vec<String>, HashMap<String, PtTensor>) {
    let bytes = std::fs::read(fixture(&format!("{name}.expected.safetensors"))).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let order: Vec<String> = meta["__order__"].split(',').map(str::to_string).collect();
    let mut map = HashMap::new();
    for n in &order {
        let view = st.tensor(n).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let t = PtTensor { shape: view.shape().to_vec(), data, dtype: meta[n].clone() };
        map.insert(n.clone(), t);
    }
    (order, map)
}

/// Exact comparison (bit patterns) of names/order, shapes, dtypes and values.
fn assert_matches(got: &PtStateDict, name: &str) {
    let (order, exp) = expected(name);
    let got_names: Vec<&str> = got.tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(got_names, order, "{name}: tensor names / order");
    for (n, t) in &got.tensors {
        let e = &exp[n];
        assert_eq!(t.shape, e.shape, "{name}/{n}: shape");
        assert_eq!(t.dtype, e.dtype, "{name}/{n}: dtype");
        assert_eq!(t.data.len(), e.data.len(), "{name}/{n}: length");
        let gb: Vec<u32> = t.data.iter().map(|x| x.to_bits()).collect();
        let eb: Vec<u32> = e.data.iter().map(|x| x.to_bits()).collect();
        assert_eq!(gb, eb, "{name}/{n}: values {:?} vs {:?}", t.data, e.data);
    }
}

fn tensor<'a>(sd: &'a PtStateDict, name: &str) -> &'a PtTensor {
    &sd.tensors.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
}

// ---------------------------------------------------------------------------------------------
// Valid checkpoints
// ---------------------------------------------------------------------------------------------

#[test]
fn bare_state_dict() {
    let sd = read("bare.pt", None);
    assert_eq!(sd.key, None);
    assert!(sd.top_level_keys.is_empty());
    assert_matches(&sd, "bare");
    let nbt = tensor(&sd, "norm.num_batches_tracked");
    assert_eq!((nbt.dtype.as_str(), nbt.shape.as_slice(), nbt.data.as_slice()), ("I64", &[][..], &[12.0][..]));
    assert_eq!(tensor(&sd, "conv.weight").shape, vec![3, 2, 3, 3]);
}

#[test]
fn bare_state_dict_with_key_is_an_error() {
    let msg = read_err("bare.pt", Some("ema_model"));
    assert!(msg.contains("bare state_dict"), "{msg}");
}

#[test]
fn checkpoint_default_picks_ema_model() {
    let sd = read("ckpt.pt", None);
    assert_eq!(sd.key.as_deref(), Some("ema_model"));
    assert_eq!(sd.top_level_keys, ["net_model", "ema_model", "sched", "optim", "step"]);
    assert_matches(&sd, "ckpt_ema");
}

#[test]
fn checkpoint_explicit_keys() {
    let net = read("ckpt.pt", Some("net_model"));
    assert_eq!(net.key.as_deref(), Some("net_model"));
    assert_matches(&net, "ckpt_net");
    let ema = read("ckpt.pt", Some("ema_model"));
    assert_matches(&ema, "ckpt_ema");
    assert_ne!(tensor(&net, "conv.weight").data, tensor(&ema, "conv.weight").data);
}

#[test]
fn checkpoint_missing_key_lists_available_keys() {
    let msg = read_err("ckpt.pt", Some("model"));
    for k in ["'model'", "net_model", "ema_model", "sched", "optim", "step"] {
        assert!(msg.contains(k), "message lacks {k}: {msg}");
    }
    assert!(msg.contains("ckpt.pt"), "message should name the file: {msg}");
}

#[test]
fn checkpoint_key_that_is_not_a_state_dict() {
    for k in ["optim", "sched", "step"] {
        let msg = read_err("ckpt.pt", Some(k));
        assert!(msg.contains("not a state_dict") && msg.contains("ema_model"), "{msg}");
    }
}

#[test]
fn two_state_dicts_without_ema_are_ambiguous() {
    let msg = read_err("two_models.pt", None);
    assert!(msg.contains("net_model") && msg.contains("other_model"), "{msg}");
    let sd = read("two_models.pt", Some("other_model"));
    assert_eq!(sd.top_level_keys, ["net_model", "other_model", "step"]);
    assert_matches(&sd, "ckpt_ema");
}

#[test]
fn dtypes_are_converted() {
    let sd = read("dtypes.pt", None);
    assert_matches(&sd, "dtypes");
    assert_eq!(tensor(&sd, "i64").data, vec![-(2f32.powi(40)), -1.0, 0.0, 7.0, 2f32.powi(20)]);
    assert_eq!(tensor(&sd, "u8").data, vec![0.0, 255.0, 17.0]);
    assert_eq!(tensor(&sd, "u16").data, vec![0.0, 65535.0, 3.0]);
    assert_eq!(tensor(&sd, "bool").data, vec![1.0, 0.0, 1.0]);
    assert_eq!(tensor(&sd, "scalar").shape, Vec::<usize>::new());
    assert_eq!(tensor(&sd, "scalar").data, vec![2.5]);
    assert_eq!(tensor(&sd, "empty").shape, vec![0, 3]);
    assert!(tensor(&sd, "empty").data.is_empty());
    let dts: Vec<&str> = sd.tensors.iter().map(|(_, t)| t.dtype.as_str()).collect();
    assert_eq!(dts, ["F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "U16", "BOOL", "F32", "F32"]);
}

#[test]
fn strided_views_and_storage_offsets() {
    let sd = read("views.pt", None);
    assert_matches(&sd, "views");
    let big = tensor(&sd, "big");
    let at = |r: usize, c: usize| big.data[r * 6 + c];
    assert_eq!(tensor(&sd, "rows").data, big.data[6..18].to_vec());
    assert_eq!(tensor(&sd, "col").data, (0..4).map(|r| at(r, 2)).collect::<Vec<_>>());
    let bt = tensor(&sd, "block_t");
    assert_eq!(bt.shape, vec![3, 3]);
    for i in 0..3 {
        for j in 0..3 {
            assert_eq!(bt.data[i * 3 + j], at(1 + j, 2 + i));
        }
    }
    let (w, wt) = (tensor(&sd, "w"), tensor(&sd, "wt"));
    assert_eq!((w.shape.as_slice(), wt.shape.as_slice()), (&[3, 5][..], &[5, 3][..]));
    for i in 0..3 {
        for j in 0..5 {
            assert_eq!(w.data[i * 5 + j], wt.data[j * 3 + i]);
        }
    }
    assert_eq!(tensor(&sd, "expanded").data, vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0]);
    assert_eq!(tensor(&sd, "step2").data, vec![1.0, 4.0, 7.0]);
}

#[test]
fn module_prefixed_keys_under_ema_model() {
    let sd = read("module_prefixed.pt", None);
    assert_eq!(sd.key.as_deref(), Some("ema_model"));
    assert_eq!(sd.top_level_keys, ["ema_model", "step"]);
    assert!(sd.tensors.iter().all(|(n, _)| n.starts_with("module.")));
    assert_matches(&sd, "module_prefixed");
}

#[test]
fn checkpoint_without_crc() {
    assert_matches(&read("nocrc.pt", None), "nocrc");
}

#[test]
fn archive_with_another_name() {
    assert_matches(&read("renamed.pt", None), "bare");
}

#[test]
fn big_endian_checkpoint() {
    assert_matches(&read("bigendian.pt", None), "bigendian");
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn legacy_format_is_rejected() {
    let msg = read_err("legacy.pt", None);
    assert!(msg.contains("not a zip archive") && msg.contains("legacy"), "{msg}");
    assert!(msg.contains("legacy.pt"), "{msg}");
}

#[test]
fn broken_archives_give_specific_errors() {
    let msg = read_err("bad_missing_storage.pt", None);
    assert!(msg.contains("missing storage entry") && msg.contains("data/1"), "{msg}");
    let msg = read_err("bad_short_storage.pt", None);
    assert!(msg.contains("storage entry has 40 bytes"), "{msg}");
    let msg = read_err("bad_opcode.pt", None);
    assert!(msg.contains("unsupported pickle opcode 0xff") && msg.contains("offset 5"), "{msg}");
    let msg = read_err("bad_no_pickle.pt", None);
    assert!(msg.contains("data.pkl"), "{msg}");
    let msg = read_err("bad_deflated.pt", None);
    assert!(msg.contains("compressed"), "{msg}");
    let msg = read_err("does_not_exist.pt", None);
    assert!(msg.contains("does_not_exist.pt"), "{msg}");
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("pt_reader_{tag}_{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Deterministic xorshift generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Run the reader, turning a panic into a test failure that names the input.
fn read_guarded(path: &Path, key: Option<&str>, what: &str) -> anyhow::Result<PtStateDict> {
    std::panic::catch_unwind(|| read_pt_state_dict(path, key)).unwrap_or_else(|_| panic!("reader panicked on {what}"))
}

#[test]
fn garbage_files_are_errors() {
    let dir = TempDir::new("garbage");
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("pk".into(), b"PK".to_vec()),
        ("pk_header".into(), b"PK\x03\x04".to_vec()),
        ("pk_empty_zip".into(), b"PK\x05\x06\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0".to_vec()),
        ("pickle".into(), b"\x80\x02}q\x00.".to_vec()),
    ];
    for len in [1usize, 10, 100, 1000, 10000] {
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        cases.push((format!("random{len}"), bytes.clone()));
        let mut pk = b"PK\x03\x04".to_vec();
        pk.extend_from_slice(&bytes);
        cases.push((format!("pk_random{len}"), pk));
    }
    for (name, bytes) in cases {
        let p = dir.write(&name, &bytes);
        let r = read_guarded(&p, None, &name);
        assert!(r.is_err(), "garbage {name} was accepted");
    }
}

#[test]
fn truncated_files_are_errors() {
    let dir = TempDir::new("trunc");
    for src in ["ckpt.pt", "views.pt"] {
        let full = std::fs::read(fixture(src)).unwrap();
        let n = full.len();
        let mut lens: Vec<usize> = (0..n).step_by(37).collect();
        lens.extend(n.saturating_sub(300)..n);
        for len in lens {
            let p = dir.write("t.pt", &full[..len]);
            let what = format!("{src} truncated to {len}/{n} bytes");
            let r = read_guarded(&p, None, &what);
            assert!(r.is_err(), "{what} was accepted");
        }
    }
}

#[test]
fn corrupted_files_error_or_read_unchanged() {
    let dir = TempDir::new("flip");
    let mut rng = Rng(12345);
    for (src, step) in [("views.pt", 3usize), ("ckpt.pt", 13)] {
        let full = std::fs::read(fixture(src)).unwrap();
        let reference = read(src, None);
        let mut errors = 0;
        for pos in (0..full.len()).step_by(step) {
            let mut bytes = full.clone();
            bytes[pos] ^= 1 << (rng.next() % 8);
            let p = dir.write("f.pt", &bytes);
            let what = format!("{src} with a bit flipped at byte {pos}");
            match read_guarded(&p, None, &what) {
                Err(_) => errors += 1,
                // Flips in bytes nobody reads (alignment padding, local-header copies of
                // metadata, ...) are harmless; anything else must be caught (CRC, structure).
                Ok(sd) => {
                    assert_eq!(sd.key, reference.key, "{what}");
                    assert_eq!(sd.tensors, reference.tensors, "{what}");
                }
            }
        }
        assert!(errors > 0, "{src}: no corruption detected at all");
    }
}

#[test]
fn corrupted_pickle_with_valid_crc_never_panics() {
    // Mutate data.pkl itself (not caught by a CRC) and rebuild a valid zip around it, so the
    // unpickler and tensor checks see arbitrary input.
    let src = std::fs::read(fixture("views.pt")).unwrap();
    let pkl = extract_stored(&src, "views/data.pkl");
    let dir = TempDir::new("pickle");
    let mut rng = Rng(777);
    for i in 0..1500 {
        let mut p = pkl.clone();
        match i % 3 {
            0 => {
                let k = (rng.next() as usize) % p.len();
                p[k] = rng.next() as u8;
            }
            1 => {
                let k = (rng.next() as usize) % p.len();
                p.truncate(k);
            }
            _ => {
                for _ in 0..4 {
                    let k = (rng.next() as usize) % p.len();
                    p[k] ^= 1 << (rng.next() % 8);
                }
            }
        }
        let zip = rebuild_zip(&src, "views/data.pkl", &p);
        let path = dir.write("p.pt", &zip);
        let _ = read_guarded(&path, None, &format!("mutated pickle #{i}"));
    }
}

// Minimal zip surgery for the pickle-mutation test: list the entries of a STORED zip and
// write them back out with one entry replaced.

fn le16(b: &[u8], at: usize) -> usize {
    u16::from_le_bytes([b[at], b[at + 1]]) as usize
}
fn le32(b: &[u8], at: usize) -> usize {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]) as usize
}

/// (name, data) of every entry, via the central directory (torch writes data descriptors,
/// so the local headers carry no sizes).
fn local_entries(zip: &[u8]) -> Vec<(String, Vec<u8>)> {
    let eocd = (0..=zip.len() - 22).rev().find(|&i| &zip[i..i + 4] == b"PK\x05\x06").unwrap();
    let count = le16(zip, eocd + 10);
    let mut at = le32(zip, eocd + 16);
    let mut out = Vec::new();
    for _ in 0..count {
        assert_eq!(&zip[at..at + 4], b"PK\x01\x02");
        let size = le32(zip, at + 20);
        let (name_len, extra_len, comment_len) = (le16(zip, at + 28), le16(zip, at + 30), le16(zip, at + 32));
        let local = le32(zip, at + 42);
        let name = String::from_utf8(zip[at + 46..at + 46 + name_len].to_vec()).unwrap();
        let data_at = local + 30 + le16(zip, local + 26) + le16(zip, local + 28);
        out.push((name, zip[data_at..data_at + size].to_vec()));
        at += 46 + name_len + extra_len + comment_len;
    }
    out
}

fn extract_stored(zip: &[u8], name: &str) -> Vec<u8> {
    local_entries(zip).into_iter().find(|(n, _)| n == name).unwrap().1
}

fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
        }
    }
    !c
}

fn rebuild_zip(src: &[u8], replace: &str, with: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    let entries = local_entries(src);
    for (name, data) in &entries {
        let data: &[u8] = if name == replace { with } else { data };
        let crc = crc32(data);
        let offset = out.len() as u32;
        let mut common = Vec::new();
        common.extend_from_slice(&20u16.to_le_bytes()); // version needed
        common.extend_from_slice(&0u16.to_le_bytes()); // flags
        common.extend_from_slice(&0u16.to_le_bytes()); // STORED
        common.extend_from_slice(&0u32.to_le_bytes()); // time/date
        common.extend_from_slice(&crc.to_le_bytes());
        common.extend_from_slice(&(data.len() as u32).to_le_bytes());
        common.extend_from_slice(&(data.len() as u32).to_le_bytes());
        common.extend_from_slice(&(name.len() as u16).to_le_bytes());
        common.extend_from_slice(&0u16.to_le_bytes()); // extra len
        out.extend_from_slice(b"PK\x03\x04");
        out.extend_from_slice(&common);
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend_from_slice(b"PK\x01\x02");
        central.extend_from_slice(&20u16.to_le_bytes()); // version made by
        central.extend_from_slice(&common);
        central.extend_from_slice(&[0u8; 10]); // comment len, disk, int attr, ext attr
        central.extend_from_slice(&offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend_from_slice(b"PK\x05\x06");
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
    out.extend_from_slice(&(central.len() as u32).to_le_bytes());
    out.extend_from_slice(&cd_offset.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out
}

#[test]
fn rebuilt_zip_roundtrip_reads() {
    // sanity check of the zip surgery used above
    let src = std::fs::read(fixture("views.pt")).unwrap();
    let pkl = extract_stored(&src, "views/data.pkl");
    let dir = TempDir::new("rebuild");
    let p = dir.write("r.pt", &rebuild_zip(&src, "views/data.pkl", &pkl));
    assert_matches(&read_pt_state_dict(&p, None).unwrap(), "views");
}
