//! Reads a GGUF file's header, metadata and tensor table without loading any weights, and
//! checks that the file is whole: a file whose tensor data ends past its last byte is truncated.
//!
//! Used by `engine-provisioner` to verify a staged model and by `llorch-engine` to refuse a bad
//! file with a clear message before llama.cpp sees it. The format is documented in ggml's
//! `docs/gguf.md`; this reader follows version 2 and 3 (little endian).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

pub mod memory;
pub mod write;

const MAGIC: &[u8; 4] = b"GGUF";
/// Upper bounds that keep a corrupt header from making us allocate gigabytes.
const MAX_STRING: u64 = 64 << 20;
const MAX_ENTRIES: u64 = 1 << 24;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value. Arrays keep only their element type and length; their contents (token
/// lists, merges) are skipped.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Uint(u64),
    Int(i64),
    Float(f64),
    Bool(bool),
    String(String),
    Array { len: u64 },
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Uint(v) => Some(v),
            Value::Int(v) if v >= 0 => Some(v as u64),
            _ => None,
        }
    }
}

/// What the header says about a model.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufInfo {
    pub version: u32,
    pub tensor_count: u64,
    pub metadata: BTreeMap<String, Value>,
    /// Where tensor data starts.
    pub data_offset: u64,
    /// The smallest file size that holds every tensor.
    pub required_size: u64,
    pub file_size: u64,
    /// Bytes of the tensors, by where llama.cpp puts them ([`memory`]).
    pub weights: WeightBytes,
}

/// Tensor bytes grouped as llama.cpp offloads them: the repeating layers (`blk.N.*`), the
/// input embedding (`token_embd.*`, always kept on the CPU) and the rest (the output head and
/// final norm, on the GPU when every layer is). Tensors of a type whose layout this reader does
/// not know count 0 bytes and are counted in `unknown_type_tensors`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WeightBytes {
    /// Bytes of layer N at index N.
    pub layers: Vec<u64>,
    pub token_embd: u64,
    /// `output.weight`: absent when the output head is tied to the input embedding, which
    /// llama.cpp then loads a second time for the output layer.
    pub output: Option<u64>,
    /// Every other tensor outside the layers (`output_norm.weight`, ...).
    pub other: u64,
    pub unknown_type_tensors: u64,
    /// What CUDA buffers add to layer N (and to the output head): a quantized matrix whose
    /// row length is not a multiple of 512 gets one padded row's bytes.
    pub cuda_padding: Vec<u64>,
    pub cuda_output_padding: u64,
}

impl WeightBytes {
    fn add(&mut self, name: &str, bytes: u64, cuda_padding: u64) {
        let layer = name
            .strip_prefix("blk.")
            .and_then(|rest| rest.split_once('.'))
            .and_then(|(n, _)| n.parse::<usize>().ok())
            // A corrupt name cannot make us allocate: layers beyond this are "other".
            .filter(|n| *n < 4096);
        if let Some(n) = layer {
            if self.layers.len() <= n {
                self.layers.resize(n + 1, 0);
                self.cuda_padding.resize(n + 1, 0);
            }
            self.layers[n] = self.layers[n].saturating_add(bytes);
            self.cuda_padding[n] = self.cuda_padding[n].saturating_add(cuda_padding);
        } else if name.starts_with("token_embd.") {
            self.token_embd = self.token_embd.saturating_add(bytes);
        } else if name == "output.weight" {
            self.output = Some(bytes);
            self.cuda_output_padding = cuda_padding;
        } else {
            self.other = self.other.saturating_add(bytes);
        }
    }

    /// Every tensor's bytes.
    pub fn total(&self) -> u64 {
        self.layers
            .iter()
            .fold(self.token_embd, |a, b| a.saturating_add(*b))
            .saturating_add(self.output.unwrap_or(0))
            .saturating_add(self.other)
    }
}

impl GgufInfo {
    /// `general.architecture`, for example `llama`.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(Value::as_str)
    }

    pub fn name(&self) -> Option<&str> {
        self.metadata.get("general.name").and_then(Value::as_str)
    }

    /// `<arch>.context_length`: the context the model was trained with.
    pub fn context_length(&self) -> Option<u64> {
        let arch = self.architecture()?;
        self.metadata
            .get(&format!("{arch}.context_length"))
            .and_then(Value::as_u64)
    }

    /// `general.file_type` as llama.cpp names it (`Q4_1`, `F16`, ...), or the number.
    pub fn file_type(&self) -> Option<String> {
        let n = self.metadata.get("general.file_type")?.as_u64()?;
        Some(file_type_name(n).map_or_else(|| n.to_string(), str::to_string))
    }

    pub fn has_chat_template(&self) -> bool {
        self.metadata.contains_key("tokenizer.chat_template")
    }

    pub(crate) fn arch_u64(&self, key: &str) -> Option<u64> {
        let arch = self.architecture()?;
        self.metadata
            .get(&format!("{arch}.{key}"))
            .and_then(Value::as_u64)
    }

    /// Bytes of KV cache one token takes at f16, as llama.cpp sizes it: layers × (key and
    /// value lengths) × KV heads × 2 bytes. Head lengths default to the embedding length over
    /// the heads, KV heads to the heads. None when the header lacks the numbers (or they make
    /// no sense).
    pub fn kv_bytes_per_token(&self) -> Option<u64> {
        let layers = self.arch_u64("block_count")?;
        let heads = self.arch_u64("attention.head_count").filter(|h| *h > 0)?;
        let kv_heads = self.arch_u64("attention.head_count_kv").unwrap_or(heads);
        let head = self.arch_u64("embedding_length")? / heads;
        let k = self.arch_u64("attention.key_length").unwrap_or(head);
        let v = self.arch_u64("attention.value_length").unwrap_or(head);
        layers
            .checked_mul(k.checked_add(v)?)?
            .checked_mul(kv_heads)?
            .checked_mul(2)
    }
}

#[cfg(test)]
mod kv_tests {
    use super::*;

    fn info(meta: &[(&str, u64)]) -> GgufInfo {
        let mut metadata: BTreeMap<String, Value> = meta
            .iter()
            .map(|(k, v)| (format!("llama.{k}"), Value::Uint(*v)))
            .collect();
        metadata.insert("general.architecture".into(), Value::String("llama".into()));
        GgufInfo {
            version: 3,
            tensor_count: 0,
            metadata,
            data_offset: 0,
            required_size: 0,
            file_size: 0,
            weights: WeightBytes::default(),
        }
    }

    #[test]
    fn kv_bytes_follow_llama_cpp() {
        // SmolLM2-135M: 30 layers, 576 wide, 9 heads, 3 KV heads. llama.cpp reports
        // "90.00 MiB (1024 cells, 30 layers, 4/4 seqs)" for 4 slots of 1024 tokens.
        let smol = info(&[
            ("block_count", 30),
            ("embedding_length", 576),
            ("attention.head_count", 9),
            ("attention.head_count_kv", 3),
        ]);
        assert_eq!(smol.kv_bytes_per_token(), Some(23_040));
        assert_eq!(smol.kv_bytes_per_token().unwrap() * 4 * 1024, 90 << 20);
        // A 70B-shaped header: 80 layers, 8192 wide, 64 heads, 8 KV heads: 320 KiB a token.
        let big = info(&[
            ("block_count", 80),
            ("embedding_length", 8192),
            ("attention.head_count", 64),
            ("attention.head_count_kv", 8),
        ]);
        assert_eq!(big.kv_bytes_per_token(), Some(327_680));
        // Missing numbers, zero heads or overflow: unknown, never a panic.
        assert_eq!(info(&[("block_count", 30)]).kv_bytes_per_token(), None);
        let zero = info(&[
            ("block_count", 1),
            ("embedding_length", 8),
            ("attention.head_count", 0),
        ]);
        assert_eq!(zero.kv_bytes_per_token(), None);
        let huge = info(&[
            ("block_count", u64::MAX),
            ("embedding_length", 8),
            ("attention.head_count", 1),
        ]);
        assert_eq!(huge.kv_bytes_per_token(), None);
    }
}

/// Why a file is not a usable GGUF model. Every variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("model file {path} does not exist")]
    NotFound { path: PathBuf },
    #[error("cannot read model file {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error(
        "{path} is not a GGUF file (it starts with {magic:?}, a GGUF file starts with \"GGUF\")"
    )]
    NotGguf { path: PathBuf, magic: String },
    #[error("{path} is truncated: it has {actual} bytes but its header describes {needed} (download it again)")]
    Truncated {
        path: PathBuf,
        needed: u64,
        actual: u64,
    },
    #[error("{path} uses GGUF version {version}; versions 2 and 3 are supported")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path} has a malformed GGUF header: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// Reads and checks the GGUF file at `path`.
pub fn inspect(path: &Path) -> Result<GgufInfo, GgufError> {
    let file = File::open(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => GgufError::NotFound {
            path: path.to_owned(),
        },
        _ => GgufError::Io {
            path: path.to_owned(),
            source,
        },
    })?;
    let file_size = file
        .metadata()
        .map_err(|source| GgufError::Io {
            path: path.to_owned(),
            source,
        })?
        .len();
    if file.metadata().map(|m| m.is_dir()).unwrap_or(false) {
        return Err(GgufError::Malformed {
            path: path.to_owned(),
            reason: "it is a directory".into(),
        });
    }
    inspect_reader(BufReader::new(file), file_size).map_err(|e| e.at(path))
}

/// A parse failure before the file name is attached.
#[derive(Debug)]
pub enum ParseError {
    Io(io::Error),
    NotGguf([u8; 4]),
    Truncated { needed: u64, actual: u64 },
    UnsupportedVersion(u32),
    Malformed(String),
}

impl ParseError {
    fn at(self, path: &Path) -> GgufError {
        let path = path.to_owned();
        match self {
            ParseError::Io(source) => GgufError::Io { path, source },
            ParseError::NotGguf(m) => GgufError::NotGguf {
                path,
                magic: String::from_utf8_lossy(&m).into_owned(),
            },
            ParseError::Truncated { needed, actual } => GgufError::Truncated {
                path,
                needed,
                actual,
            },
            ParseError::UnsupportedVersion(version) => {
                GgufError::UnsupportedVersion { path, version }
            }
            ParseError::Malformed(reason) => GgufError::Malformed { path, reason },
        }
    }
}

struct Reader<R> {
    inner: R,
    pos: u64,
    file_size: u64,
}

impl<R: Read + Seek> Reader<R> {
    fn bytes<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let mut buf = [0u8; N];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.eof(e, N as u64))?;
        self.pos += N as u64;
        Ok(buf)
    }

    fn eof(&self, e: io::Error, wanted: u64) -> ParseError {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            ParseError::Truncated {
                needed: self.pos + wanted,
                actual: self.file_size,
            }
        } else {
            ParseError::Io(e)
        }
    }

    fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }

    fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }

    fn skip(&mut self, n: u64) -> Result<(), ParseError> {
        if self.pos + n > self.file_size {
            return Err(ParseError::Truncated {
                needed: self.pos + n,
                actual: self.file_size,
            });
        }
        self.inner
            .seek(SeekFrom::Current(n as i64))
            .map_err(ParseError::Io)?;
        self.pos += n;
        Ok(())
    }

    fn string(&mut self) -> Result<String, ParseError> {
        let len = self.u64()?;
        if len > MAX_STRING {
            return Err(ParseError::Malformed(format!(
                "a string of {len} bytes at offset {}",
                self.pos - 8
            )));
        }
        if self.pos + len > self.file_size {
            return Err(ParseError::Truncated {
                needed: self.pos + len,
                actual: self.file_size,
            });
        }
        let mut buf = vec![0u8; len as usize];
        self.inner
            .read_exact(&mut buf)
            .map_err(|e| self.eof(e, len))?;
        self.pos += len;
        String::from_utf8(buf).map_err(|_| {
            ParseError::Malformed(format!(
                "a string that is not UTF-8 before offset {}",
                self.pos
            ))
        })
    }

    fn value(&mut self, ty: u32) -> Result<Value, ParseError> {
        Ok(match ty {
            0 => Value::Uint(u8::from_le_bytes(self.bytes()?) as u64),
            1 => Value::Int(i8::from_le_bytes(self.bytes()?) as i64),
            2 => Value::Uint(u16::from_le_bytes(self.bytes()?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.bytes()?) as i64),
            4 => Value::Uint(self.u32()? as u64),
            5 => Value::Int(i32::from_le_bytes(self.bytes()?) as i64),
            6 => Value::Float(f32::from_le_bytes(self.bytes()?) as f64),
            7 => Value::Bool(self.bytes::<1>()?[0] != 0),
            8 => Value::String(self.string()?),
            9 => {
                let elem = self.u32()?;
                let len = self.u64()?;
                if len > MAX_ENTRIES * 16 {
                    return Err(ParseError::Malformed(format!("an array of {len} elements")));
                }
                match scalar_size(elem) {
                    Some(size) => self.skip(len * size)?,
                    None if elem == 8 => {
                        for _ in 0..len {
                            let n = self.u64()?;
                            if n > MAX_STRING {
                                return Err(ParseError::Malformed(format!(
                                    "an array string of {n} bytes"
                                )));
                            }
                            self.skip(n)?;
                        }
                    }
                    None => {
                        return Err(ParseError::Malformed(format!(
                            "an array of unsupported element type {elem}"
                        )))
                    }
                }
                Value::Array { len }
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(i64::from_le_bytes(self.bytes()?)),
            12 => Value::Float(f64::from_le_bytes(self.bytes()?)),
            other => {
                return Err(ParseError::Malformed(format!(
                    "unknown metadata value type {other}"
                )))
            }
        })
    }
}

fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Block size (elements) and bytes per block of the ggml tensor types whose layout is certain.
/// Tensors of other types are checked only for their start offset.
pub(crate) fn ggml_type_layout(ty: u32) -> Option<(u64, u64)> {
    Some(match ty {
        0 => (1, 4),       // F32
        1 => (1, 2),       // F16
        2 => (32, 18),     // Q4_0
        3 => (32, 20),     // Q4_1
        6 => (32, 22),     // Q5_0
        7 => (32, 24),     // Q5_1
        8 => (32, 34),     // Q8_0
        9 => (32, 36),     // Q8_1
        10 => (256, 84),   // Q2_K
        11 => (256, 110),  // Q3_K
        12 => (256, 144),  // Q4_K
        13 => (256, 176),  // Q5_K
        14 => (256, 210),  // Q6_K
        15 => (256, 292),  // Q8_K
        16 => (256, 66),   // IQ2_XXS
        17 => (256, 74),   // IQ2_XS
        18 => (256, 98),   // IQ3_XXS
        19 => (256, 50),   // IQ1_S
        20 => (32, 18),    // IQ4_NL
        21 => (256, 110),  // IQ3_S
        22 => (256, 82),   // IQ2_S
        23 => (256, 136),  // IQ4_XS
        24 => (1, 1),      // I8
        25 => (1, 2),      // I16
        26 => (1, 4),      // I32
        27 | 28 => (1, 8), // I64, F64
        29 => (256, 56),   // IQ1_M
        30 => (1, 2),      // BF16
        34 => (256, 54),   // TQ1_0
        35 => (256, 66),   // TQ2_0
        39 => (32, 17),    // MXFP4
        _ => return None,
    })
}

fn file_type_name(n: u64) -> Option<&'static str> {
    Some(match n {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return None,
    })
}

/// Parses a GGUF stream of `file_size` bytes.
pub fn inspect_reader<R: Read + Seek>(inner: R, file_size: u64) -> Result<GgufInfo, ParseError> {
    let mut r = Reader {
        inner,
        pos: 0,
        file_size,
    };
    let magic = match r.bytes::<4>() {
        Ok(m) => m,
        Err(ParseError::Truncated { .. }) => {
            let mut m = [0u8; 4];
            r.inner.seek(SeekFrom::Start(0)).map_err(ParseError::Io)?;
            let n = r.inner.read(&mut m).map_err(ParseError::Io)?;
            return Err(if n == 0 {
                ParseError::Malformed("the file is empty".into())
            } else {
                ParseError::NotGguf(m)
            });
        }
        Err(e) => return Err(e),
    };
    if &magic != MAGIC {
        return Err(ParseError::NotGguf(magic));
    }
    let version = r.u32()?;
    if !(2..=3).contains(&version) {
        return Err(ParseError::UnsupportedVersion(version));
    }
    let tensor_count = r.u64()?;
    let kv_count = r.u64()?;
    if tensor_count > MAX_ENTRIES || kv_count > MAX_ENTRIES {
        return Err(ParseError::Malformed(format!(
            "{tensor_count} tensors and {kv_count} metadata entries"
        )));
    }
    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty)?;
        metadata.insert(key, value);
    }
    let alignment = metadata
        .get("general.alignment")
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_ALIGNMENT);
    if alignment == 0 || !alignment.is_power_of_two() {
        return Err(ParseError::Malformed(format!(
            "general.alignment is {alignment}"
        )));
    }
    let mut data_end = 0u64;
    let mut weights = WeightBytes::default();
    for _ in 0..tensor_count {
        let name = r.string()?;
        let n_dims = r.u32()?;
        if n_dims > 8 {
            return Err(ParseError::Malformed(format!(
                "tensor {name:?} has {n_dims} dimensions"
            )));
        }
        let mut elements: u64 = 1;
        let mut row = 0;
        for d in 0..n_dims {
            let n = r.u64()?;
            if d == 0 {
                row = n;
            }
            elements = elements.saturating_mul(n);
        }
        let ty = r.u32()?;
        let offset = r.u64()?;
        let (bytes, padding) = match ggml_type_layout(ty) {
            Some((block, size)) => {
                // ggml-cuda's MATRIX_ROW_PADDING, for quantized types.
                let quantized = block > 1 || ty == 9;
                let short = (512 - row % 512) % 512;
                let padding = if quantized { short / block * size } else { 0 };
                (elements.div_ceil(block).saturating_mul(size), padding)
            }
            None => {
                weights.unknown_type_tensors += 1;
                (0, 0)
            }
        };
        weights.add(&name, bytes, padding);
        data_end = data_end.max(offset.saturating_add(bytes));
    }
    let data_offset = r.pos.div_ceil(alignment) * alignment;
    let required_size = data_offset.saturating_add(data_end);
    if required_size > file_size {
        return Err(ParseError::Truncated {
            needed: required_size,
            actual: file_size,
        });
    }
    Ok(GgufInfo {
        version,
        tensor_count,
        metadata,
        data_offset,
        required_size,
        file_size,
        weights,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::TestModel;

    #[test]
    fn reads_metadata_of_a_written_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        TestModel::default().write(&path).unwrap();
        let info = inspect(&path).unwrap();
        assert_eq!(info.architecture(), Some("llama"));
        assert_eq!(info.context_length(), Some(256));
        assert_eq!(info.file_type().as_deref(), Some("F32"));
        assert!(info.has_chat_template());
        assert_eq!(info.tensor_count, 2);
        assert_eq!(info.required_size, info.file_size);
    }

    #[test]
    fn every_truncation_is_reported_as_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.gguf");
        TestModel::default().write(&path).unwrap();
        let whole = std::fs::read(&path).unwrap();
        for cut in [8, 20, 60, whole.len() / 2, whole.len() - 1] {
            std::fs::write(&path, &whole[..cut]).unwrap();
            match inspect(&path) {
                Err(GgufError::Truncated { actual, .. }) => assert_eq!(actual, cut as u64),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_files_are_not_gguf_and_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, b"hello, this is text").unwrap();
        let err = inspect(&path).unwrap_err();
        assert!(matches!(err, GgufError::NotGguf { .. }), "{err:?}");
        assert!(err.to_string().contains("notes.txt"));
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(inspect(&path), Err(GgufError::Malformed { .. })));
        let missing = dir.path().join("missing.gguf");
        let err = inspect(&missing).unwrap_err();
        assert!(matches!(err, GgufError::NotFound { .. }));
        assert!(err.to_string().contains("missing.gguf"));
    }
}
