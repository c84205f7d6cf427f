//! A minimal GGUF writer for tests: small, valid files with chosen metadata and zeroed F32
//! tensors. Not a model llama.cpp can run; for that, tests use the bundled default model.

use std::io::{self, Write};
use std::path::Path;

/// A tiny GGUF file description.
#[derive(Debug, Clone)]
pub struct TestModel {
    pub architecture: String,
    pub context_length: u32,
    pub chat_template: Option<String>,
    /// (name, element count) of F32 tensors.
    pub tensors: Vec<(String, u64)>,
}

impl Default for TestModel {
    fn default() -> Self {
        Self {
            architecture: "llama".into(),
            context_length: 256,
            chat_template: Some("{{ messages }}".into()),
            tensors: vec![("a.weight".into(), 64), ("b.weight".into(), 100)],
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

impl TestModel {
    /// The file's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        let kv = 3 + u64::from(self.chat_template.is_some());
        out.extend_from_slice(&kv.to_le_bytes());
        put_str(&mut out, "general.architecture");
        out.extend_from_slice(&8u32.to_le_bytes());
        put_str(&mut out, &self.architecture);
        put_str(&mut out, &format!("{}.context_length", self.architecture));
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&self.context_length.to_le_bytes());
        put_str(&mut out, "general.file_type");
        out.extend_from_slice(&4u32.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        if let Some(t) = &self.chat_template {
            put_str(&mut out, "tokenizer.chat_template");
            out.extend_from_slice(&8u32.to_le_bytes());
            put_str(&mut out, t);
        }
        let mut offset = 0u64;
        for (name, n) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&1u32.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += (n * 4).div_ceil(32) * 32;
        }
        out.resize(out.len().div_ceil(32) * 32, 0);
        let data_start = out.len();
        let mut end = data_start as u64;
        let mut o = 0u64;
        for (_, n) in &self.tensors {
            end = data_start as u64 + o + n * 4;
            o += (n * 4).div_ceil(32) * 32;
        }
        out.resize(end as usize, 0);
        out
    }

    pub fn write(&self, path: &Path) -> io::Result<()> {
        let mut f = std::fs::File::create(path)?;
        f.write_all(&self.to_bytes())?;
        f.sync_all()
    }
}

/// A metadata value for [`Header`].
#[derive(Debug, Clone)]
pub enum Meta {
    U32(u32),
    Str(String),
    /// An array of `len` strings, all empty (a vocabulary whose size is all that matters).
    Strings(u64),
}

/// A GGUF header with any metadata and tensors of any shape and ggml type, without the tensor
/// data: for tests of what is computed from a header (a 70B-shaped model's header is a few
/// kilobytes; [`Header::required_size`] is the size its whole file would have).
#[derive(Debug, Clone, Default)]
pub struct Header {
    pub metadata: Vec<(String, Meta)>,
    /// (name, dimensions, ggml type number, bytes).
    tensors: Vec<(String, Vec<u64>, u32, u64)>,
}

impl Header {
    pub fn meta(mut self, key: &str, value: Meta) -> Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor of `bytes` bytes (the caller computes them for the type).
    pub fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32, bytes: u64) -> Self {
        self.tensors
            .push((name.into(), dims.to_vec(), ggml_type, bytes));
        self
    }

    fn aligned(n: u64) -> u64 {
        n.div_ceil(32) * 32
    }

    /// The header's bytes, padded to where the data would start.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_str(&mut out, key);
            match value {
                Meta::U32(v) => {
                    out.extend_from_slice(&4u32.to_le_bytes());
                    out.extend_from_slice(&v.to_le_bytes());
                }
                Meta::Str(v) => {
                    out.extend_from_slice(&8u32.to_le_bytes());
                    put_str(&mut out, v);
                }
                Meta::Strings(n) => {
                    out.extend_from_slice(&9u32.to_le_bytes());
                    out.extend_from_slice(&8u32.to_le_bytes());
                    out.extend_from_slice(&n.to_le_bytes());
                    for _ in 0..*n {
                        put_str(&mut out, "");
                    }
                }
            }
        }
        let mut offset = 0u64;
        for (name, dims, ty, bytes) in &self.tensors {
            put_str(&mut out, name);
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offset += Self::aligned(*bytes);
        }
        out.resize(Self::aligned(out.len() as u64) as usize, 0);
        out
    }

    /// The size of the whole file this header describes.
    pub fn required_size(&self) -> u64 {
        let data: u64 = match self.tensors.split_last() {
            Some(((_, _, _, last), rest)) => {
                rest.iter().map(|t| Self::aligned(t.3)).sum::<u64>() + last
            }
            None => 0,
        };
        self.to_bytes().len() as u64 + data
    }
}
