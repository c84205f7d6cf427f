//! How much memory llama.cpp will take for a model, from its header, before anything loads:
//! the weights (where llama.cpp puts each tensor), the KV cache for every slot's context and
//! the compute buffer. `engine-provisioner` uses it to refuse a GPU pool that cannot fit, or to
//! offload only the layers that do (docs/OPERATIONS.md, "GPUs").
//!
//! What llama.cpp does, and so what is counted:
//! - With `gpu_layers` ≥ the layer count every repeating layer and the output head are on the
//!   GPUs; the input embedding (`token_embd`) always stays on the CPU. A tied output head (no
//!   `output.weight`) is the embedding loaded a second time, on the GPU.
//! - On a GPU, a quantized matrix whose rows are not a multiple of 512 long takes one padded
//!   row more (ggml-cuda's `MATRIX_ROW_PADDING`).
//! - The KV cache of an offloaded layer is on that layer's GPU: layers × (K + V) × KV heads × 2
//!   bytes (f16) per token, for `ctx_per_slot × slots` tokens.
//! - Layers are spread over several GPUs in proportion to their free memory (llama.cpp's
//!   default split), the output head on the last.
//! - The compute buffer, with flash attention (llama.cpp's `auto` turns it on for CUDA and the
//!   CPU), was measured on the default model at four context sizes: logits for one ubatch
//!   (`ubatch × n_vocab × 4`), activations (`ubatch × (n_ff + 3 × n_embd) × 4`), the attention
//!   mask (`ubatch × ctx_per_slot × 2`) and 1 MiB. It sits on the GPU that holds the output.
//! - A CUDA process also holds its context and cuBLAS workspace on each GPU it uses:
//!   [`CUDA_OVERHEAD_BYTES`], an assumption `scripts/gpu-smoke.sh` compares with the truth.

use crate::GgufInfo;

const MIB: u64 = 1 << 20;

/// VRAM a CUDA process takes on each GPU before any tensor: the context, kernels and cuBLAS
/// workspace (300 to 500 MiB on current drivers).
pub const CUDA_OVERHEAD_BYTES: u64 = 512 * MIB;

/// What the engine will be asked to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub slots: u32,
    pub ctx_per_slot: u32,
    /// Layers to offload (`999`: all of them, and the output head).
    pub gpu_layers: u32,
    /// Tokens per micro-batch (the engine's 512).
    pub ubatch: u32,
}

/// The estimate, in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Estimate {
    pub layers: u32,
    /// Repeating layers on the GPUs.
    pub offloaded_layers: u32,
    pub output_on_gpu: bool,
    pub gpu_weights: u64,
    pub cpu_weights: u64,
    pub gpu_kv: u64,
    pub cpu_kv: u64,
    pub compute: u64,
    /// Bytes of each layer's weights and of each layer's KV cache (for splitting).
    layer_weights: Vec<u64>,
    layer_kv: u64,
    output_weights: u64,
}

/// Why no estimate can be made: the header lacks a number it needs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot estimate the model's memory: {0}")]
pub struct EstimateError(String);

/// How a GPU pool fits on its GPUs (free bytes of each, in the pool's order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fit {
    /// Everything asked for fits; what each GPU will hold.
    Fits { per_gpu: Vec<u64> },
    /// Only `layers` of the model's layers fit (0: none); what each GPU would then hold.
    Partial { layers: u32, per_gpu: Vec<u64> },
}

impl Estimate {
    /// Everything on the GPUs, overhead excluded.
    pub fn gpu_bytes(&self) -> u64 {
        if self.offloaded_layers == 0 && !self.output_on_gpu {
            return 0;
        }
        self.gpu_weights
            .saturating_add(self.gpu_kv)
            .saturating_add(self.compute)
    }

    /// Everything on the GPUs including [`CUDA_OVERHEAD_BYTES`] on each of `gpus`.
    pub fn gpu_bytes_on(&self, gpus: usize) -> u64 {
        self.gpu_bytes()
            .saturating_add(CUDA_OVERHEAD_BYTES.saturating_mul(gpus as u64))
    }

    /// What each GPU holds when the offloaded layers are split over GPUs with `free` bytes as
    /// llama.cpp splits them (layers in proportion to free memory, the output head and the
    /// compute buffer on the last), overhead included.
    pub fn split(&self, free: &[u64]) -> Vec<u64> {
        let n = free.len();
        let mut per_gpu = vec![0u64; n];
        if n == 0 || self.gpu_bytes() == 0 {
            return per_gpu;
        }
        let total_free: u128 = free.iter().map(|f| *f as u128).sum::<u128>().max(1);
        // llama.cpp: layer il goes to the first GPU whose cumulative share exceeds il / layers.
        let mut cumulative = Vec::with_capacity(n);
        let mut acc = 0u128;
        for f in free {
            acc += *f as u128;
            cumulative.push(acc as f64 / total_free as f64);
        }
        let offloaded = self.offloaded_layers as usize;
        let first = self.layers as usize - offloaded;
        for il in first..self.layers as usize {
            let at = (il - first) as f64 / offloaded.max(1) as f64;
            let gpu = cumulative.iter().position(|c| at < *c).unwrap_or(n - 1);
            let layer = self.layer_weights.get(il).copied().unwrap_or(0);
            per_gpu[gpu] = per_gpu[gpu]
                .saturating_add(layer)
                .saturating_add(self.layer_kv);
        }
        let last = &mut per_gpu[n - 1];
        if self.output_on_gpu {
            *last = last.saturating_add(self.output_weights);
        }
        *last = last.saturating_add(self.compute);
        for b in &mut per_gpu {
            *b = b.saturating_add(CUDA_OVERHEAD_BYTES);
        }
        per_gpu
    }

    /// Whether the request fits GPUs with `free` bytes; if not, how many layers would.
    pub fn fit(&self, info: &GgufInfo, request: Request, free: &[u64]) -> Fit {
        let fits = |e: &Estimate| {
            let per_gpu = e.split(free);
            per_gpu
                .iter()
                .zip(free)
                .all(|(need, have)| need <= have)
                .then_some(per_gpu)
        };
        if let Some(per_gpu) = fits(self) {
            return Fit::Fits { per_gpu };
        }
        // Fewer layers: the output head and the compute buffer go back to the CPU first.
        let mut layers = self.offloaded_layers.min(self.layers);
        loop {
            let e = estimate(
                info,
                Request {
                    gpu_layers: layers,
                    ..request
                },
            )
            .unwrap_or_else(|_| self.clone());
            if layers == 0 {
                return Fit::Partial {
                    layers: 0,
                    per_gpu: vec![0; free.len()],
                };
            }
            if let Some(per_gpu) = fits(&e) {
                return Fit::Partial { layers, per_gpu };
            }
            layers -= 1;
        }
    }
}

/// The estimate for `request` of the model `info` describes.
pub fn estimate(info: &GgufInfo, request: Request) -> Result<Estimate, EstimateError> {
    let missing = |what: &str| EstimateError(format!("the header has no {what}"));
    let w = &info.weights;
    if w.unknown_type_tensors > 0 {
        return Err(EstimateError(format!(
            "{} tensors have a type whose size this version does not know",
            w.unknown_type_tensors
        )));
    }
    let layers = info
        .arch_u64("block_count")
        .ok_or_else(|| missing("block_count"))?;
    let layers = u32::try_from(layers)
        .ok()
        .filter(|l| *l as usize == w.layers.len())
        .ok_or_else(|| {
            EstimateError(format!(
                "block_count is {layers} but the file has tensors for {} layers",
                w.layers.len()
            ))
        })?;
    let kv_token = info
        .kv_bytes_per_token()
        .ok_or_else(|| missing("attention head counts"))?;
    let n_embd = info
        .arch_u64("embedding_length")
        .ok_or_else(|| missing("embedding_length"))?;
    let n_ff = info
        .arch_u64("feed_forward_length")
        .unwrap_or(n_embd.saturating_mul(4));
    let n_vocab = info
        .arch_u64("vocab_size")
        .or_else(|| match info.metadata.get("tokenizer.ggml.tokens") {
            Some(crate::Value::Array { len }) => Some(*len),
            _ => None,
        })
        .ok_or_else(|| missing("vocabulary size"))?;

    // The header is outside input: every sum saturates, so a crafted file gets an estimate
    // too large to fit anywhere, never an overflow.
    let sum = |v: &[u64]| v.iter().fold(0u64, |a, b| a.saturating_add(*b));
    let offloaded_layers = request.gpu_layers.min(layers);
    let output_on_gpu = request.gpu_layers > layers;
    // A tied head is the embedding, loaded again for the output layer.
    let output_weights = sum(&[
        w.output.unwrap_or(w.token_embd),
        w.cuda_output_padding,
        w.other,
    ]);
    let first_gpu_layer = (layers - offloaded_layers) as usize;
    // On the GPU each layer's weights are CUDA's allocation sizes.
    let layer_weights: Vec<u64> = w
        .layers
        .iter()
        .zip(w.cuda_padding.iter().chain(std::iter::repeat(&0)))
        .map(|(b, p)| b.saturating_add(*p))
        .collect();
    let tokens = request.ctx_per_slot as u64 * request.slots as u64;
    let layer_kv = (kv_token / layers.max(1) as u64).saturating_mul(tokens);
    let ubatch = request.ubatch as u64;
    let compute = sum(&[
        sum(&[n_vocab, n_ff, n_embd.saturating_mul(3)]).saturating_mul(ubatch * 4),
        ubatch * request.ctx_per_slot as u64 * 2,
        MIB,
    ]);
    // On the CPU a tied head is the embedding already mapped, not a second copy.
    let (gpu_output, cpu_output) = if output_on_gpu {
        (output_weights, 0)
    } else {
        (0, w.output.unwrap_or(0).saturating_add(w.other))
    };
    Ok(Estimate {
        layers,
        offloaded_layers,
        output_on_gpu,
        gpu_weights: sum(&layer_weights[first_gpu_layer..]).saturating_add(gpu_output),
        cpu_weights: sum(&[w.token_embd, sum(&w.layers[..first_gpu_layer]), cpu_output]),
        gpu_kv: layer_kv.saturating_mul(offloaded_layers as u64),
        cpu_kv: layer_kv.saturating_mul((layers - offloaded_layers) as u64),
        compute,
        layer_weights,
        layer_kv,
        output_weights,
    })
}

/// `n` bytes in MiB with two decimals, as llama.cpp prints them.
pub fn mib(n: u64) -> String {
    format!("{:.2} MiB", n as f64 / MIB as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::ggml::{F32, Q2_K, Q4_0, Q6_K};
    use crate::write::{Header, LlamaShape, Meta};

    /// A Llama-2-shaped header with a 32,000-token vocabulary, quantized as llama.cpp's
    /// `quantize` does (output head Q6_K, norms F32, the rest `ty`).
    fn llama(layers: u64, embd: u64, ff: u64, heads: u64, kv_heads: u64, ty: u32) -> GgufInfo {
        Header::llama(LlamaShape {
            layers,
            embd,
            ff,
            heads,
            kv_heads,
            vocab: 32_000,
            ty,
            output_ty: Q6_K,
        })
        .info()
    }

    fn all_on_gpu(slots: u32, ctx: u32) -> Request {
        Request {
            slots,
            ctx_per_slot: ctx,
            gpu_layers: 999,
            ubatch: 512,
        }
    }

    #[test]
    fn llama_2_7b_q4_0_matches_llama_cpp() {
        // llama.cpp loading Llama-2-7B Q4_0 with every layer offloaded prints
        // "CPU buffer size = 70.31 MiB", "CUDA0 buffer size = 3577.56 MiB" and, at n_ctx 4096,
        // "KV self size = 2048.00 MiB".
        let info = llama(32, 4096, 11008, 32, 32, Q4_0);
        let e = estimate(&info, all_on_gpu(1, 4096)).unwrap();
        assert_eq!(mib(e.cpu_weights), "70.31 MiB");
        assert_eq!(mib(e.gpu_weights), "3577.56 MiB");
        assert_eq!(mib(e.gpu_kv), "2048.00 MiB");
        assert_eq!((e.offloaded_layers, e.output_on_gpu), (32, true));
        // The same KV spread over 4 slots of 1024 tokens.
        let e4 = estimate(&info, all_on_gpu(4, 1024)).unwrap();
        assert_eq!(e4.gpu_kv, e.gpu_kv);
        // On the CPU (no layer offloaded) everything is in the CPU's mapping.
        let cpu = estimate(
            &info,
            Request {
                gpu_layers: 0,
                ..all_on_gpu(1, 4096)
            },
        )
        .unwrap();
        assert_eq!(cpu.gpu_bytes(), 0);
        assert_eq!(cpu.cpu_weights, info.weights.total());
        // A 24 GB card holds it; a 4 GB card holds 25 of its 32 layers.
        let gib = 1u64 << 30;
        assert!(matches!(
            e.fit(&info, all_on_gpu(1, 4096), &[23 * gib]),
            Fit::Fits { .. }
        ));
        match e.fit(&info, all_on_gpu(1, 4096), &[4 * gib]) {
            Fit::Partial { layers, per_gpu } => {
                assert!((15..32).contains(&layers), "{layers}");
                assert!(per_gpu[0] <= 4 * gib);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn llama_2_70b_q4_0_matches_llama_cpp() {
        // Llama-2-70B Q4_0: llama.cpp reports "model size = 36.20 GiB", of which the
        // embedding, "CPU buffer size = 140.62 MiB", stays on the CPU; its KV cache (8 KV heads)
        // is 1280 MiB at n_ctx 4096.
        let info = llama(80, 8192, 28672, 64, 8, Q4_0);
        assert_eq!(
            format!(
                "{:.2} GiB",
                info.weights.total() as f64 / (1u64 << 30) as f64
            ),
            "36.20 GiB"
        );
        let e = estimate(&info, all_on_gpu(1, 4096)).unwrap();
        assert_eq!(mib(e.cpu_weights), "140.62 MiB");
        assert_eq!(mib(e.gpu_kv), "1280.00 MiB");
        assert_eq!(e.gpu_weights, info.weights.total() - e.cpu_weights);
        // Neither a 24 GB nor a 24 + 12 GB pair holds it; two 48 GB cards do.
        let free_24 = 23_500 * MIB;
        let free_12 = 11_600 * MIB;
        let free_48 = 47_000 * MIB;
        assert!(matches!(
            e.fit(&info, all_on_gpu(1, 4096), &[free_24, free_12]),
            Fit::Partial { .. }
        ));
        match e.fit(&info, all_on_gpu(1, 4096), &[free_48, free_48]) {
            Fit::Fits { per_gpu } => {
                assert_eq!(per_gpu.len(), 2);
                assert_eq!(per_gpu.iter().sum::<u64>(), e.gpu_bytes_on(2));
                // Layers go half and half; the head and the compute buffer go to the last.
                assert!(per_gpu[1] > per_gpu[0]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_24_and_a_12_gb_card_together_hold_what_neither_holds_alone() {
        // A 70B-shaped model at Q2_K: about 23 GiB of weights.
        let info = llama(80, 8192, 28672, 64, 8, Q2_K);
        let request = all_on_gpu(2, 2048);
        let e = estimate(&info, request).unwrap();
        let (free_24, free_12) = (23_500 * MIB, 11_600 * MIB);
        assert!(matches!(
            e.fit(&info, request, &[free_24]),
            Fit::Partial { .. }
        ));
        assert!(matches!(
            e.fit(&info, request, &[free_12]),
            Fit::Partial { .. }
        ));
        match e.fit(&info, request, &[free_24, free_12]) {
            Fit::Fits { per_gpu } => {
                assert!(
                    per_gpu[0] <= free_24 && per_gpu[1] <= free_12,
                    "{per_gpu:?}"
                );
                // In proportion to free memory: the 24 GB card takes about two thirds.
                let share = per_gpu[0] as f64 / (per_gpu[0] + per_gpu[1]) as f64;
                assert!((0.55..0.72).contains(&share), "{share}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn absurd_header_numbers_give_an_estimate_that_fits_nowhere_not_a_panic() {
        // A crafted header: an embedding 2^60 wide over as many heads (one-wide heads, so its
        // KV cache stays countable), no feed-forward length, a vocabulary of 2^64 - 1.
        let info = Header::default()
            .meta("general.architecture", Meta::Str("llama".into()))
            .meta("llama.block_count", Meta::U64(1))
            .meta("llama.embedding_length", Meta::U64(1 << 60))
            .meta("llama.attention.head_count", Meta::U64(1 << 60))
            .meta("llama.vocab_size", Meta::U64(u64::MAX))
            .tensor("blk.0.w.weight", &[64], F32)
            .info();
        let request = all_on_gpu(64, 1 << 20);
        let e = estimate(&info, request).unwrap();
        assert_eq!(e.compute, u64::MAX);
        assert_eq!(e.gpu_bytes_on(8), u64::MAX);
        assert!(matches!(
            e.fit(&info, request, &[1 << 40, 1 << 40]),
            Fit::Partial { layers: 0, .. }
        ));
    }

    #[test]
    fn a_header_without_the_numbers_gives_a_reason() {
        let mut info = llama(2, 64, 128, 4, 4, F32);
        info.metadata.remove("llama.block_count");
        let err = estimate(&info, all_on_gpu(1, 64)).unwrap_err();
        assert!(err.to_string().contains("block_count"), "{err}");
        let mut info = llama(2, 64, 128, 4, 4, F32);
        info.weights.unknown_type_tensors = 3;
        assert!(estimate(&info, all_on_gpu(1, 64)).is_err());
    }
}
