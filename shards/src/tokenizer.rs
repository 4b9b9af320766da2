//! Qwen's byte-level BPE over `qwen.tiktoken` (SPEC §2), with the special tokens recognised inside text.
//!
//! The algorithm is tiktoken's: NFC-normalise, split the text at special tokens, cut each ordinary
//! piece with the pre-tokenisation regex, then merge bytes pairwise by lowest rank.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine;
use fancy_regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

/// The pre-tokenisation pattern of Qwen (needs look-ahead, hence fancy-regex).
const PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Number of ordinary BPE ranks in `qwen.tiktoken`.
pub const NUM_BPE_RANKS: usize = 151_643;

pub const ENDOFTEXT: u32 = 151_643;
pub const IM_START: u32 = 151_644;
pub const IM_END: u32 = 151_645;
pub const REF_START: u32 = 151_851;
pub const REF_END: u32 = 151_852;
pub const BOX_START: u32 = 151_853;
pub const BOX_END: u32 = 151_854;
pub const QUAD_START: u32 = 151_855;
pub const QUAD_END: u32 = 151_856;
pub const IMG_START: u32 = 151_857;
pub const IMG_END: u32 = 151_858;
pub const IMG_PAD: u32 = 151_859;
/// Token id of " is": an `<img>` two positions after it is a reference image (SPEC §1.5).
pub const IS_TOKEN: u32 = 374;
pub const NEWLINE: u32 = 198;
/// Tokens per image span: `<img>`, 256 body positions, `</img>`.
pub const IMAGE_SPAN: usize = 258;
pub const IMAGE_BODY: usize = 256;

/// All special tokens of SPEC §2 with their ids, in id order.
pub fn special_tokens() -> Vec<(String, u32)> {
    let mut v = vec![
        ("<|endoftext|>".to_string(), ENDOFTEXT),
        ("<|im_start|>".to_string(), IM_START),
        ("<|im_end|>".to_string(), IM_END),
    ];
    for i in 0..205u32 {
        v.push((format!("<|extra_{i}|>"), 151_646 + i));
    }
    for (i, s) in ["<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>", "<img>", "</img>", "<imgpad>"].iter().enumerate() {
        v.push((s.to_string(), REF_START + i as u32));
    }
    v
}

/// Where the tokenizer file is looked for, in order: `$IDAVLM_TOKENIZER`, `./.deps/qwen.tiktoken`,
/// then `.deps/qwen.tiktoken` beside each ancestor of the executable and of the current directory.
pub fn default_tokenizer_path() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("IDAVLM_TOKENIZER") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(Error::TokenizerMissing(format!("IDAVLM_TOKENIZER={} does not name a file", p.display())))
        };
    }
    let mut roots = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().map(Path::to_path_buf));
    }
    for r in roots {
        let p = r.join(".deps").join("qwen.tiktoken");
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(Error::TokenizerMissing(
        "qwen.tiktoken not found in $IDAVLM_TOKENIZER or any .deps/ above the working directory or the executable".into(),
    ))
}

pub struct Tokenizer {
    ranks: HashMap<Vec<u8>, u32>,
    decoder: Vec<Vec<u8>>,
    specials: HashMap<String, u32>,
    special_by_id: HashMap<u32, String>,
    special_re: Regex,
    piece_re: Regex,
}

impl Tokenizer {
    /// Loads the tokenizer found by [`default_tokenizer_path`].
    pub fn load_default() -> Result<Self> {
        Self::from_file(&default_tokenizer_path()?)
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut ranks = HashMap::with_capacity(NUM_BPE_RANKS);
        let mut decoder = vec![Vec::new(); NUM_BPE_RANKS];
        for (lineno, line) in text.lines().enumerate() {
            if line.is_empty() {
                continue;
            }
            let bad = |what: &str| Error::Format { file: path.to_path_buf(), detail: format!("line {}: {what}", lineno + 1) };
            let (b64, rank) = line.split_once(' ').ok_or_else(|| bad("expected 'base64 rank'"))?;
            let bytes = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|_| bad("bad base64"))?;
            let rank: u32 = rank.trim().parse().map_err(|_| bad("bad rank"))?;
            if rank as usize >= NUM_BPE_RANKS {
                return Err(bad("rank out of range"));
            }
            decoder[rank as usize] = bytes.clone();
            ranks.insert(bytes, rank);
        }
        if ranks.len() != NUM_BPE_RANKS {
            return Err(Error::Format {
                file: path.to_path_buf(),
                detail: format!("{} ranks, expected {NUM_BPE_RANKS}", ranks.len()),
            });
        }
        let specials: HashMap<String, u32> = special_tokens().into_iter().collect();
        let special_by_id = specials.iter().map(|(k, v)| (*v, k.clone())).collect();
        let mut alts: Vec<&String> = specials.keys().collect();
        // Longest first so that no special is shadowed by a prefix of another.
        alts.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let special_re = Regex::new(&alts.iter().map(|s| fancy_regex::escape(s).into_owned()).collect::<Vec<_>>().join("|"))
            .expect("special-token regex");
        let piece_re = Regex::new(PATTERN).expect("pre-tokenisation regex");
        Ok(Self { ranks, decoder, specials, special_by_id, special_re, piece_re })
    }

    pub fn special_id(&self, token: &str) -> Option<u32> {
        self.specials.get(token).copied()
    }

    /// Encodes text; special tokens written in the text become their ids.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let text: String = text.nfc().collect();
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        let mut start = 0;
        for m in self.special_re.find_iter(&text) {
            let m = m.expect("special-token regex cannot fail");
            self.encode_ordinary_into(&text[start..m.start()], &mut out);
            out.push(self.specials[m.as_str()]);
            start = m.end();
        }
        self.encode_ordinary_into(&text[start..], &mut out);
        out
    }

    /// Encodes text without looking for special tokens.
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let text: String = text.nfc().collect();
        let mut out = Vec::new();
        self.encode_ordinary_into(&text, &mut out);
        out
    }

    fn encode_ordinary_into(&self, text: &str, out: &mut Vec<u32>) {
        for m in self.piece_re.find_iter(text) {
            // The pattern has no back-references; a failure would be a backtracking limit on absurd input.
            let piece = match m {
                Ok(m) => m.as_str().as_bytes(),
                Err(_) => text.as_bytes(),
            };
            match self.ranks.get(piece) {
                Some(&r) => out.push(r),
                None => self.bpe(piece, out),
            }
        }
    }

    /// tiktoken's byte-pair merge: repeatedly merge the adjacent pair whose concatenation has the lowest rank.
    fn bpe(&self, piece: &[u8], out: &mut Vec<u32>) {
        // parts[i] = start offset of part i; the last entry is the end sentinel.
        let mut parts: Vec<usize> = (0..=piece.len()).collect();
        let rank_of = |parts: &[usize], i: usize| -> Option<u32> {
            if i + 2 < parts.len() {
                self.ranks.get(&piece[parts[i]..parts[i + 2]]).copied()
            } else {
                None
            }
        };
        let mut pair_ranks: Vec<Option<u32>> = (0..parts.len()).map(|i| rank_of(&parts, i)).collect();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for (i, r) in pair_ranks.iter().enumerate().take(parts.len().saturating_sub(2)) {
                if let Some(r) = *r {
                    if best.is_none_or(|(br, _)| r < br) {
                        best = Some((r, i));
                    }
                }
            }
            let Some((_, i)) = best else { break };
            parts.remove(i + 1);
            pair_ranks.remove(i + 1);
            pair_ranks[i] = rank_of(&parts, i);
            if i > 0 {
                pair_ranks[i - 1] = rank_of(&parts, i - 1);
            }
        }
        for w in parts.windows(2) {
            // Every single byte has a rank in a byte-level vocabulary.
            out.push(self.ranks[&piece[w[0]..w[1]]]);
        }
    }

    /// Decodes ids to text (invalid UTF-8 is replaced); special tokens are written out.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            if let Some(b) = self.decoder.get(id as usize) {
                bytes.extend_from_slice(b);
            } else if let Some(s) = self.special_by_id.get(&id) {
                bytes.extend_from_slice(s.as_bytes());
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn vocab_size(&self) -> usize {
        NUM_BPE_RANKS + self.specials.len()
    }
}
