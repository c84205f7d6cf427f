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
    U64(u64),
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

/// ggml type numbers the tests build headers with.
pub mod ggml {
    pub const F32: u32 = 0;
    pub const Q4_0: u32 = 2;
    pub const Q2_K: u32 = 10;
    pub const Q6_K: u32 = 14;
}

/// The shape of a Llama-style model, for [`Header::llama`].
#[derive(Debug, Clone, Copy)]
pub struct LlamaShape {
    pub layers: u64,
    pub embd: u64,
    pub ff: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub vocab: u64,
    /// The type of the matrices; norms are F32.
    pub ty: u32,
    /// The output head's type (llama.cpp's `quantize` makes it Q6_K).
    pub output_ty: u32,
}

impl Header {
    pub fn meta(mut self, key: &str, value: Meta) -> Self {
        self.metadata.push((key.into(), value));
        self
    }

    /// Adds a tensor; its bytes follow from its type (0 for a type the reader does not know).
    pub fn tensor(mut self, name: &str, dims: &[u64], ggml_type: u32) -> Self {
        let elements = dims.iter().fold(1u64, |a, d| a.saturating_mul(*d));
        let bytes = crate::ggml_type_layout(ggml_type).map_or(0, |(block, size)| {
            elements.div_ceil(block).saturating_mul(size)
        });
        self.tensors
            .push((name.into(), dims.to_vec(), ggml_type, bytes));
        self
    }

    /// A Llama-style model's header: the architecture's numbers, a vocabulary, the embedding,
    /// each layer's norms, attention and feed-forward matrices, the final norm and the output
    /// head, named as llama.cpp names them.
    pub fn llama(s: LlamaShape) -> Self {
        let kv = s.embd / s.heads * s.kv_heads;
        let mut h = Self::default()
            .meta("general.architecture", Meta::Str("llama".into()))
            .meta("llama.block_count", Meta::U64(s.layers))
            .meta("llama.embedding_length", Meta::U64(s.embd))
            .meta("llama.feed_forward_length", Meta::U64(s.ff))
            .meta("llama.attention.head_count", Meta::U64(s.heads))
            .meta("llama.attention.head_count_kv", Meta::U64(s.kv_heads))
            .meta("tokenizer.ggml.tokens", Meta::Strings(s.vocab))
            .tensor("token_embd.weight", &[s.embd, s.vocab], s.ty);
        for l in 0..s.layers {
            for (name, dims, ty) in [
                ("attn_norm", [s.embd, 1], ggml::F32),
                ("attn_q", [s.embd, s.embd], s.ty),
                ("attn_k", [s.embd, kv], s.ty),
                ("attn_v", [s.embd, kv], s.ty),
                ("attn_output", [s.embd, s.embd], s.ty),
                ("ffn_norm", [s.embd, 1], ggml::F32),
                ("ffn_gate", [s.embd, s.ff], s.ty),
                ("ffn_up", [s.embd, s.ff], s.ty),
                ("ffn_down", [s.ff, s.embd], s.ty),
            ] {
                h = h.tensor(&format!("blk.{l}.{name}.weight"), &dims, ty);
            }
        }
        h.tensor("output_norm.weight", &[s.embd], ggml::F32).tensor(
            "output.weight",
            &[s.embd, s.vocab],
            s.output_ty,
        )
    }

    /// The header parsed, as if its file were whole.
    pub fn info(&self) -> crate::GgufInfo {
        crate::inspect_reader(std::io::Cursor::new(self.to_bytes()), self.required_size())
            .expect("a header this writer made parses")
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
                Meta::U64(v) => {
                    out.extend_from_slice(&10u32.to_le_bytes());
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
