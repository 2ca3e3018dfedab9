//! Zip access for `torch.save` archives: opening the file, locating `<archive>/data.pkl`,
//! reading whole STORED entries with size and CRC32 checks, and the storage bytes.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::rc::Rc;
use std::sync::OnceLock;

use anyhow::{Context, Result, anyhow, bail};
use zip::{CompressionMethod, ZipArchive};

const NOT_ZIP: &str = "not a zip archive (is this a PyTorch >= 1.6 checkpoint? legacy non-zip .pt files are not supported)";

/// An opened `torch.save` archive.
pub(super) struct Archive {
    zip: ZipArchive<BufReader<File>>,
    file_len: u64,
    /// All entry names, in archive order.
    names: Vec<String>,
    /// The `<archive>/data.pkl` entry.
    pub(super) pkl_name: String,
    /// `<archive>/` (everything before `data.pkl`).
    pub(super) prefix: String,
    /// Storage bytes already read, by storage key.
    storages: HashMap<String, Rc<Vec<u8>>>,
}

impl Archive {
    /// Open `path` as a zip archive and locate its single `*/data.pkl`.
    pub(super) fn open(path: &Path) -> Result<Archive> {
        let mut file = File::open(path).context("cannot open file")?;
        let file_len = file.metadata().context("cannot stat file")?.len();
        let mut magic = [0u8; 4];
        let mut got = 0;
        while got < 4 {
            let n = file.read(&mut magic[got..]).context("cannot read file")?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got < 4 || &magic != b"PK\x03\x04" {
            bail!("{NOT_ZIP}");
        }
        file.seek(SeekFrom::Start(0)).context("cannot seek file")?;
        let zip = ZipArchive::new(BufReader::new(file)).map_err(|e| anyhow!("corrupt or truncated zip archive: {e}"))?;

        // Locate `<archive>/data.pkl`.
        let names: Vec<String> = zip.file_names_raw().map(|n| String::from_utf8_lossy(n).into_owned()).collect();
        let pkl: Vec<&String> = names.iter().filter(|n| n.as_str() == "data.pkl" || n.ends_with("/data.pkl")).filter(|n| n.matches('/').count() <= 1).collect();
        let pkl_name = match pkl.as_slice() {
            [one] => (*one).clone(),
            [] => {
                let shown: Vec<&str> = names.iter().take(10).map(|s| s.as_str()).collect();
                bail!("zip archive has no '<archive>/data.pkl' entry, so it is not a torch.save checkpoint (entries: {shown:?}{})", if names.len() > 10 { ", ..." } else { "" });
            }
            many => bail!("zip archive has several data.pkl entries: {many:?}"),
        };
        let prefix = pkl_name[..pkl_name.len() - "data.pkl".len()].to_string();
        Ok(Archive { zip, file_len, names, pkl_name, prefix, storages: HashMap::new() })
    }

    /// Read a whole entry (see [`read_entry`]). `Ok(None)` if the entry is absent.
    pub(super) fn read(&mut self, name: &str) -> Result<Option<Vec<u8>>> {
        read_entry(&mut self.zip, name, self.file_len)
    }

    /// `<archive>/byteorder` says `big` (missing means little-endian).
    pub(super) fn big_endian(&mut self) -> Result<bool> {
        let prefix = self.prefix.clone();
        Ok(match self.read(&format!("{prefix}byteorder"))? {
            None => false,
            Some(b) => match String::from_utf8_lossy(&b).trim() {
                "little" => false,
                "big" => true,
                other => bail!("unknown byteorder {other:?} in {prefix}byteorder"),
            },
        })
    }

    /// The bytes of `<archive>/data.pkl`.
    pub(super) fn pickle(&mut self) -> Result<Vec<u8>> {
        let name = self.pkl_name.clone();
        self.read(&name)?.ok_or_else(|| anyhow!("missing {name}"))
    }

    /// TorchScript archives (`torch.jit.save`) have a `<archive>/constants.pkl`.
    pub(super) fn is_torchscript(&self) -> bool {
        let constants = format!("{}constants.pkl", self.prefix);
        self.names.iter().any(|n| n == &constants)
    }

    /// The raw bytes of storage `key` (`<archive>/data/<key>`), read once and then shared.
    /// `Ok(None)` if the entry is absent.
    pub(super) fn storage(&mut self, key: &str) -> Result<Option<Rc<Vec<u8>>>> {
        if let Some(b) = self.storages.get(key) {
            return Ok(Some(b.clone()));
        }
        let entry = format!("{}data/{key}", self.prefix);
        let Some(b) = self.read(&entry)? else {
            return Ok(None);
        };
        let b = Rc::new(b);
        self.storages.insert(key.to_string(), b.clone());
        Ok(Some(b))
    }
}

fn crc32_table() -> &'static [[u32; 256]; 8] {
    static TABLE: OnceLock<[[u32; 256]; 8]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = [[0u32; 256]; 8];
        for i in 0..256u32 {
            let mut c = i;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            t[0][i as usize] = c;
        }
        for i in 0..256 {
            for k in 1..8 {
                let prev = t[k - 1][i];
                t[k][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            }
        }
        t
    })
}

fn crc32(data: &[u8]) -> u32 {
    let t = crc32_table();
    let mut c = !0u32;
    let mut chunks = data.chunks_exact(8);
    for ch in &mut chunks {
        let lo = c ^ u32::from_le_bytes([ch[0], ch[1], ch[2], ch[3]]);
        let hi = u32::from_le_bytes([ch[4], ch[5], ch[6], ch[7]]);
        c = t[7][(lo & 0xff) as usize]
            ^ t[6][((lo >> 8) & 0xff) as usize]
            ^ t[5][((lo >> 16) & 0xff) as usize]
            ^ t[4][(lo >> 24) as usize]
            ^ t[3][(hi & 0xff) as usize]
            ^ t[2][((hi >> 8) & 0xff) as usize]
            ^ t[1][((hi >> 16) & 0xff) as usize]
            ^ t[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        c = t[0][((c ^ b as u32) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// Read a whole STORED entry, checking its size and CRC. `Ok(None)` if the entry is absent.
fn read_entry<R: Read + Seek>(zip: &mut ZipArchive<R>, name: &str, file_len: u64) -> Result<Option<Vec<u8>>> {
    let Some(idx) = zip.index_for_name(name) else {
        return Ok(None);
    };
    let mut f = zip.by_index_raw(idx).map_err(|e| anyhow!("corrupt zip entry '{name}': {e}"))?;
    if f.compression() != CompressionMethod::Stored {
        bail!("zip entry '{name}' is compressed (zip compression method {:?}); only uncompressed (STORED) entries, as written by torch.save, are supported", f.compression());
    }
    if f.encrypted() {
        bail!("zip entry '{name}' is encrypted");
    }
    let size = f.size();
    if f.compressed_size() != size {
        bail!("corrupt zip entry '{name}': stored entry has compressed size {} != size {size}", f.compressed_size());
    }
    if size > file_len {
        bail!("zip entry '{name}' claims {size} bytes but the file has only {file_len} (truncated or corrupt file)");
    }
    let expected_crc = f.crc32();
    let mut buf = Vec::with_capacity(size as usize);
    f.read_to_end(&mut buf).map_err(|e| anyhow!("cannot read zip entry '{name}' (truncated or corrupt file): {e}"))?;
    if buf.len() as u64 != size {
        bail!("zip entry '{name}' is truncated: got {} of {size} bytes", buf.len());
    }
    // torch can be told not to compute CRCs (they are then written as 0).
    if expected_crc != 0 {
        let got = crc32(&buf);
        if got != expected_crc {
            bail!("CRC mismatch in zip entry '{name}' (expected {expected_crc:08x}, got {got:08x}); the file is corrupt");
        }
    }
    Ok(Some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_known_value() {
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        let long: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        // byte-at-a-time reference
        let mut c = !0u32;
        for &b in &long {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
        }
        assert_eq!(crc32(&long), !c);
    }
}
