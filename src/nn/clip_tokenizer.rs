//! CLIP's byte-level BPE tokenizer, as Hugging Face's `CLIPTokenizerFast` runs it.
//!
//! Text → NFC, runs of whitespace → one space, lower case → the pieces of CLIP's pattern
//! (`'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+`) → each piece's UTF-8 bytes as
//! GPT-2's printable byte characters, `</w>` on the last one → BPE merges by rank → ids, between
//! `<|startoftext|>` and `<|endoftext|>`, truncated to the model's context (77). The special
//! tokens written in the text are kept as tokens. The vocabulary comes from a Hugging Face folder:
//! `tokenizer.json`, or `vocab.json` + `merges.txt`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use regex::Regex;
use serde_json::Value;
use unicode_normalization::UnicodeNormalization;

use super::clip::read_json;

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// GPT-2's map from bytes to printable characters: the printable Latin-1 bytes stand for
/// themselves, the others are shifted to U+0100 and up.
fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let printable = |b: u32| (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b);
    let mut n = 0;
    for b in 0..256u32 {
        out[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            n += 1;
            char::from_u32(255 + n).expect("shifted byte")
        };
    }
    out
}

/// The tokenizer: vocabulary, merge ranks and the context length.
pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    ranks: HashMap<(String, String), usize>,
    bytes: [char; 256],
    pattern: Regex,
    whitespace: Regex,
    bos: u32,
    eos: u32,
    /// Tokens per sequence, the two special ones included.
    pub max_len: usize,
}

impl ClipTokenizer {
    /// From a vocabulary (token → id) and merges in rank order.
    pub fn new(vocab: HashMap<String, u32>, merges: Vec<(String, String)>, max_len: usize) -> Result<Self> {
        let id = |t: &str| vocab.get(t).copied().with_context(|| format!("the CLIP vocabulary has no {t} token"));
        let (bos, eos) = (id(BOS)?, id(EOS)?);
        if max_len < 2 {
            bail!("a CLIP context of {max_len} tokens cannot hold the start and end tokens");
        }
        let ranks = merges.into_iter().enumerate().map(|(i, m)| (m, i)).collect();
        let pattern = Regex::new(r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+").expect("CLIP's pattern");
        let whitespace = Regex::new(r"\s+").expect("whitespace pattern");
        Ok(ClipTokenizer { vocab, ranks, bytes: byte_chars(), pattern, whitespace, bos, eos, max_len })
    }

    /// The 512 byte tokens and the two special ones, no merges (benchmarks of random models).
    pub fn bytes_only(max_len: usize) -> Result<Self> {
        let mut vocab = HashMap::new();
        let bc = byte_chars();
        for (i, c) in bc.iter().enumerate() {
            vocab.insert(c.to_string(), i as u32);
            vocab.insert(format!("{c}</w>"), 256 + i as u32);
        }
        vocab.insert(BOS.into(), 512);
        vocab.insert(EOS.into(), 513);
        Self::new(vocab, Vec::new(), max_len)
    }

    /// From a Hugging Face folder: `tokenizer.json`, else `vocab.json` + `merges.txt`.
    pub fn from_dir(dir: &Path, max_len: usize) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        let (vj, mt) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if tj.is_file() {
            let v = read_json(&tj)?;
            let model = &v["model"];
            if model["type"].as_str().is_some_and(|t| t != "BPE") {
                bail!("{}: a {} tokenizer, CLIP's is BPE", tj.display(), model["type"]);
            }
            let vocab = parse_vocab(&model["vocab"]).with_context(|| format!("in {}", tj.display()))?;
            let merges = model["merges"]
                .as_array()
                .with_context(|| format!("{} has no model.merges", tj.display()))?
                .iter()
                .map(|m| match m {
                    Value::String(s) => split_merge(s),
                    Value::Array(a) if a.len() == 2 => Ok((a[0].as_str().unwrap_or("").to_string(), a[1].as_str().unwrap_or("").to_string())),
                    _ => bail!("a merge {m} is neither \"a b\" nor [a, b]"),
                })
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("in {}", tj.display()))?;
            return Self::new(vocab, merges, max_len);
        }
        if vj.is_file() && mt.is_file() {
            let v = read_json(&vj)?;
            let vocab = parse_vocab(&v).with_context(|| format!("in {}", vj.display()))?;
            let text = std::fs::read_to_string(&mt).with_context(|| format!("cannot read {}", mt.display()))?;
            let merges = text.lines().filter(|l| !l.starts_with("#version") && !l.trim().is_empty()).map(split_merge).collect::<Result<Vec<_>>>().with_context(|| format!("in {}", mt.display()))?;
            return Self::new(vocab, merges, max_len);
        }
        bail!("no CLIP tokenizer in {}: looked for tokenizer.json, or vocab.json and merges.txt", dir.display())
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The BPE tokens of one piece of the pattern (a word).
    fn bpe(&self, word: &str) -> Vec<String> {
        let mut syms: Vec<String> = word.as_bytes().iter().map(|&b| self.bytes[b as usize].to_string()).collect();
        if let Some(last) = syms.last_mut() {
            last.push_str("</w>");
        }
        loop {
            // the adjacent pair of lowest rank, merged wherever it occurs (left to right)
            let best = syms.windows(2).filter_map(|w| self.ranks.get(&(w[0].clone(), w[1].clone())).map(|&r| (r, (w[0].clone(), w[1].clone())))).min_by_key(|(r, _)| *r);
            let Some((_, (a, b))) = best else { break };
            let mut out = Vec::with_capacity(syms.len());
            let mut i = 0;
            while i < syms.len() {
                if i + 1 < syms.len() && syms[i] == a && syms[i + 1] == b {
                    out.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    out.push(std::mem::take(&mut syms[i]));
                    i += 1;
                }
            }
            syms = out;
        }
        syms
    }

    /// The ids of `text` without the start/end tokens and without truncation.
    pub fn encode_raw(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        // the special tokens as written are tokens themselves; the text between them is normalised
        let mut rest = text;
        while !rest.is_empty() {
            let next = [(BOS, self.bos), (EOS, self.eos)].iter().filter_map(|&(s, id)| rest.find(s).map(|p| (p, s, id))).min_by_key(|x| x.0);
            let (chunk, special) = match next {
                Some((p, s, id)) => {
                    let c = &rest[..p];
                    rest = &rest[p + s.len()..];
                    (c, Some(id))
                }
                None => {
                    let c = rest;
                    rest = "";
                    (c, None)
                }
            };
            let norm: String = chunk.nfc().collect();
            let norm = self.whitespace.replace_all(&norm, " ").to_lowercase();
            for m in self.pattern.find_iter(&norm) {
                for t in self.bpe(m.as_str()) {
                    ids.push(self.vocab.get(&t).copied().unwrap_or(self.eos));
                }
            }
            ids.extend(special);
        }
        ids
    }

    /// `[<|startoftext|>, tokens…, <|endoftext|>]`, the tokens cut to `max_len − 2` (Hugging
    /// Face's `truncation=True, max_length=77`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos];
        let mut body = self.encode_raw(text);
        body.truncate(self.max_len - 2);
        ids.extend(body);
        ids.push(self.eos);
        ids
    }
}

fn parse_vocab(v: &Value) -> Result<HashMap<String, u32>> {
    let m = v.as_object().context("the vocabulary is not an object of token → id")?;
    m.iter().map(|(k, id)| Ok((k.clone(), id.as_u64().with_context(|| format!("token {k:?} has id {id}"))? as u32))).collect()
}

fn split_merge(line: &str) -> Result<(String, String)> {
    let mut it = line.split(' ');
    match (it.next(), it.next(), it.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => Ok((a.to_string(), b.to_string())),
        _ => bail!("merge line {line:?} is not two tokens"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy() -> ClipTokenizer {
        let mut vocab = HashMap::new();
        let bc = byte_chars();
        let mut n = 0u32;
        for c in bc {
            vocab.insert(c.to_string(), n);
            n += 1;
        }
        for c in bc {
            vocab.insert(format!("{c}</w>"), n);
            n += 1;
        }
        let merges = vec![("h".to_string(), "i</w>".to_string()), ("d".to_string(), "o".to_string()), ("do".to_string(), "g</w>".to_string())];
        for (a, b) in &merges {
            vocab.insert(format!("{a}{b}"), n);
            n += 1;
        }
        vocab.insert(BOS.into(), n);
        vocab.insert(EOS.into(), n + 1);
        ClipTokenizer::new(vocab, merges, 6).unwrap()
    }

    #[test]
    fn merges_apply_by_rank_and_words_end_in_w() {
        let t = toy();
        assert_eq!(t.bpe("hi"), vec!["hi</w>"]);
        assert_eq!(t.bpe("dog"), vec!["dog</w>"]);
        assert_eq!(t.bpe("dogs"), vec!["do", "g", "s</w>"]);
        // capitals are lowered, whitespace runs collapse, punctuation is its own piece
        let a = t.encode_raw("HI  dog!");
        assert_eq!(a.len(), 3);
        assert_eq!(a, t.encode_raw("hi dog!"));
        // truncation keeps the end token
        let e = t.encode("hi hi hi hi hi hi");
        assert_eq!(e.len(), 6);
        assert_eq!(e[0], t.bos);
        assert_eq!(*e.last().unwrap(), t.eos);
    }

    #[test]
    fn bytes_map_is_a_bijection() {
        let b = byte_chars();
        let mut s: Vec<char> = b.to_vec();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 256);
        assert_eq!(b[b'a' as usize], 'a');
        assert_eq!(b[b' ' as usize], 'Ġ');
    }
}
