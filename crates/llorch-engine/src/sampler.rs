//! Token sampling of one request, in llama.cpp's order: penalties, then greedy, or top-k,
//! typical, top-p, min-p, temperature and a seeded draw.
//!
//! A plain request samples with one llama.cpp chain straight from the logits. A request with a
//! grammar (structured output) or log-probabilities runs the same samplers by hand around them:
//!
//! - **Grammar**, as llama.cpp's own server does it: the chain picks a token first, and only
//!   that one token is checked against the grammar. Checking the whole vocabulary (49,152 tokens
//!   for the default model) against the grammar costs far more than a decode step, so it happens
//!   only when the pick is refused: then the grammar masks every token and the chain picks
//!   again. The grammar sees every accepted token.
//! - **Log-probabilities** are the log-softmax over the whole vocabulary after the penalties,
//!   the grammar (applied to every token in that case) and the temperature (1 when greedy),
//!   before top-k/top-p/min-p cut the candidates: the chosen token always has one, and the
//!   alternatives are those the model itself found likely.

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::data::LlamaTokenData;
use llama_cpp_2::token::data_array::LlamaTokenDataArray;
use llama_cpp_2::token::LlamaToken;
use llama_cpp_2::vocab::LlamaVocab;
use llorch_wire::engine::{TokenLogprob, TopLogprob};

/// Sampling settings of one request, defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub typical_p: f32,
    /// Tokens the penalties look back over (0: none); already resolved from -1 to the slot's
    /// context.
    pub repeat_last_n: i32,
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub seed: u32,
    /// Alternatives per token when log-probabilities are asked for.
    pub logprobs: Option<u32>,
}

/// The floor of a reported log-probability (OpenAI reports -9999 for "impossible").
const MIN_LOGPROB: f32 = -9999.0;

impl Sampling {
    fn penalties(&self, n_vocab: i32) -> Option<LlamaSampler> {
        let on = self.repeat_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0;
        (on && self.repeat_last_n > 0).then(|| {
            LlamaSampler::penalties(
                n_vocab,
                self.repeat_last_n,
                self.repeat_penalty,
                self.frequency_penalty,
                self.presence_penalty,
            )
        })
    }

    /// Everything after the penalties, ending in the pick.
    fn pick(&self) -> Vec<LlamaSampler> {
        if self.temperature == 0.0 {
            return vec![LlamaSampler::greedy()];
        }
        let mut chain = Vec::with_capacity(6);
        if self.top_k > 0 {
            chain.push(LlamaSampler::top_k(self.top_k));
        }
        if self.typical_p < 1.0 {
            chain.push(LlamaSampler::typical(self.typical_p, 1));
        }
        chain.push(LlamaSampler::top_p(self.top_p, 1));
        chain.push(LlamaSampler::min_p(self.min_p, 1));
        chain.push(LlamaSampler::temp(self.temperature));
        chain.push(LlamaSampler::dist(self.seed));
        chain
    }

    /// The sampler of one request; `grammar` is the request's grammar, already parsed.
    pub fn sampler(&self, n_vocab: i32, grammar: Option<LlamaSampler>) -> Sampler {
        if grammar.is_none() && self.logprobs.is_none() {
            let chain = self.penalties(n_vocab).into_iter().chain(self.pick());
            return Sampler::Chain(LlamaSampler::chain_simple(chain));
        }
        Sampler::Manual(Box::new(Manual {
            penalties: self.penalties(n_vocab),
            grammar,
            pick: LlamaSampler::chain_simple(self.pick()),
            logprobs: self.logprobs,
            temperature: if self.temperature > 0.0 {
                self.temperature
            } else {
                1.0
            },
        }))
    }
}

/// Stack of the threads that parse grammars and run the decode loop (which advances them):
/// llama.cpp recurses once per nested group and once per rule that starts with a rule, and
/// the bounds of `llorch_wire::gbnf` keep that depth far below what this holds. Only the
/// pages a thread touches are committed.
pub const GRAMMAR_STACK_BYTES: usize = 64 << 20;

/// Parses a GBNF grammar for `model` (root rule `root`).
pub fn grammar(model: &LlamaModel, gbnf: &str) -> Result<LlamaSampler, String> {
    LlamaSampler::grammar(model, gbnf, "root").map_err(|e| e.to_string())
}

/// Checks that a GBNF grammar parses for `model`, on a thread of [`GRAMMAR_STACK_BYTES`]
/// (a request handler's thread has 2 MiB).
pub fn check_grammar(model: &LlamaModel, gbnf: &str) -> Result<(), String> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("grammar".into())
            .stack_size(GRAMMAR_STACK_BYTES)
            .spawn_scoped(s, || grammar(model, gbnf).map(drop))
            .map_err(|e| format!("cannot start a thread to parse the grammar: {e}"))?
            .join()
            .map_err(|_| "parsing the grammar panicked".to_string())?
    })
}

pub enum Sampler {
    /// Neither grammar nor log-probabilities: llama.cpp samples from the logits directly.
    Chain(LlamaSampler),
    Manual(Box<Manual>),
}

pub struct Manual {
    penalties: Option<LlamaSampler>,
    grammar: Option<LlamaSampler>,
    pick: LlamaSampler,
    logprobs: Option<u32>,
    temperature: f32,
}

/// A sampled token, with its log-probability when asked for.
pub struct Sampled {
    pub token: LlamaToken,
    pub logprob: Option<TokenLogprob>,
}

impl Sampler {
    /// Samples (and accepts) the next token from the logits at batch index `idx`.
    pub fn sample(&mut self, ctx: &LlamaContext<'_>, idx: i32, vocab: &LlamaVocab<'_>) -> Sampled {
        match self {
            Self::Chain(chain) => Sampled {
                token: chain.sample(ctx, idx),
                logprob: None,
            },
            Self::Manual(m) => m.sample(ctx, idx, vocab),
        }
    }
}

impl Manual {
    fn sample(&mut self, ctx: &LlamaContext<'_>, idx: i32, vocab: &LlamaVocab<'_>) -> Sampled {
        let mut cur = ctx.token_data_array_ith(idx);
        if let Some(p) = self.penalties.as_mut() {
            cur.apply_sampler(p);
        }
        // With log-probabilities the grammar masks every token, so the alternatives reported
        // are ones the answer could really have taken.
        let masked = match (self.grammar.as_mut(), self.logprobs) {
            (Some(g), Some(_)) => {
                cur.apply_sampler(g);
                true
            }
            _ => false,
        };
        let keep = (self.logprobs.is_some() || (self.grammar.is_some() && !masked))
            .then(|| cur.data.clone());
        let mut token = self.draw(cur);
        if let (Some(g), false) = (self.grammar.as_mut(), masked) {
            let mut single =
                LlamaTokenDataArray::new(vec![LlamaTokenData::new(token, 1.0, 0.0)], false);
            single.apply_sampler(g);
            if single.data[0].logit() == f32::NEG_INFINITY {
                let mut all =
                    LlamaTokenDataArray::new(keep.clone().expect("kept for the grammar"), false);
                all.apply_sampler(g);
                token = self.draw(all);
            }
        }
        if let Some(p) = self.penalties.as_mut() {
            p.accept(token);
        }
        if let Some(g) = self.grammar.as_mut() {
            g.accept(token);
        }
        self.pick.accept(token);
        let logprob = self.logprobs.map(|top| {
            let data = keep.as_deref().expect("kept for the log-probabilities");
            logprobs(vocab, data, token, top as usize, self.temperature)
        });
        Sampled { token, logprob }
    }

    fn draw(&mut self, mut cur: LlamaTokenDataArray) -> LlamaToken {
        cur.apply_sampler(&mut self.pick);
        // Every chain ends in greedy or dist, which always select; the first candidate is a
        // safe answer should a future chain not.
        cur.selected_token()
            .unwrap_or_else(|| cur.data.first().map_or(LlamaToken(0), LlamaTokenData::id))
    }
}

/// The log-softmax of `data`'s logits at `temperature`, for `token` and the `top` most likely.
fn logprobs(
    vocab: &LlamaVocab<'_>,
    data: &[LlamaTokenData],
    token: LlamaToken,
    top: usize,
    temperature: f32,
) -> TokenLogprob {
    let max = data
        .iter()
        .map(LlamaTokenData::logit)
        .fold(f32::NEG_INFINITY, f32::max);
    let scale = |logit: f32| (logit - max) / temperature;
    let sum: f64 = data.iter().map(|d| f64::from(scale(d.logit())).exp()).sum();
    let log_z = sum.ln() as f32;
    let lp = |logit: f32| (scale(logit) - log_z).max(MIN_LOGPROB);
    // Token ids are the indices of the logits, in order (penalties and the grammar change
    // logits, never the order).
    let chosen = data
        .get(token.0 as usize)
        .filter(|d| d.id() == token)
        .or_else(|| data.iter().find(|d| d.id() == token))
        .map_or(MIN_LOGPROB, |d| lp(d.logit()));
    let mut best: Vec<&LlamaTokenData> = data
        .iter()
        .filter(|d| d.logit() > f32::NEG_INFINITY)
        .collect();
    let top = top.min(best.len());
    if top > 0 && top < best.len() {
        best.select_nth_unstable_by(top - 1, |a, b| b.logit().total_cmp(&a.logit()));
    }
    best.truncate(top);
    best.sort_by(|a, b| b.logit().total_cmp(&a.logit()));
    let piece = |t: LlamaToken| {
        let mut bytes = Vec::with_capacity(16);
        vocab.token_to_piece_into(t, &mut bytes, false, None);
        bytes
    };
    let bytes = piece(token);
    TokenLogprob {
        token: String::from_utf8_lossy(&bytes).into_owned(),
        logprob: chosen,
        bytes,
        top_logprobs: best
            .into_iter()
            .map(|d| {
                let bytes = piece(d.id());
                TopLogprob {
                    token: String::from_utf8_lossy(&bytes).into_owned(),
                    logprob: lp(d.logit()),
                    bytes,
                }
            })
            .collect(),
    }
}
