//! Where each prompt prefix is probably cached: cache-aware placement's memory.
//!
//! Engines keep prompt prefixes in their slots, shared cells and host cache (the engine's
//! `prefix.rs`); a request whose prefix a pool holds costs that pool only its new tokens. This
//! index remembers, per pool, the prefixes of the requests placed there, as a chain of hashes
//! over the request's text: one block per chat message (role and content, tool calls and the
//! call id), or per 512 bytes of a raw prompt. A prompt's expected cached share on a pool is the
//! length of its deepest block that pool was sent.
//!
//! It hashes the text, not tokens: orchestratord does not tokenize (the engines render and
//! tokenize, each with its model's template), and messages are where real prefixes end: a
//! shared system prompt is the first block, a conversation's history the blocks before its
//! last turn. It is the router's own record, as SGLang's cache-aware router keeps one, not a
//! report from the nodes: it costs no protocol and no node traffic, and it is wrong only where
//! an engine evicted or restarted, which the bound per pool, the forgetting of pools that stop
//! serving, and placement's load rule keep harmless (docs/ARCHITECTURE.md, "Cache-aware
//! placement").
//!
//! Hashes use a key drawn at start, so a client cannot craft prompts whose blocks collide with
//! another client's; they never leave the process.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

use llorch_wire::engine::{ChatMessage, GenerateRequest};

use crate::registry::PoolKey;

/// Bytes of a raw prompt per block.
pub(crate) const PROMPT_BLOCK: usize = 512;
/// Blocks remembered per pool (least recently placed forgotten first): some 8,000 prefixes, a
/// few hundred KiB per pool.
pub(crate) const BLOCKS_PER_POOL: usize = 8192;
/// Blocks hashed per request at most: a prompt longer than this many blocks is matched on its
/// beginning only.
const MAX_BLOCKS: usize = 256;

/// One block of a request's prefix: the hash of everything up to its end, and how many bytes
/// of text that is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Block {
    pub hash: u64,
    pub bytes: u32,
}

/// The hasher of every chain in this process (a key drawn at start).
fn hasher() -> impl Hasher {
    static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
        std::sync::OnceLock::new();
    KEY.get_or_init(std::collections::hash_map::RandomState::new)
        .build_hasher()
}

/// The cache scope of a client (an API key's name): engines reuse prompt state only within
/// one scope. Keyed per process, so the number says nothing about the name.
pub(crate) fn scope_of(client: &str) -> u64 {
    let mut h = hasher();
    h.write(b"scope");
    h.write(client.as_bytes());
    h.finish()
}

/// The chain of blocks of `req`'s prompt (empty for an empty prompt), seeded with its cache
/// scope: two clients' identical prompts are different chains, as engines keep them apart.
pub(crate) fn blocks(req: &GenerateRequest) -> Vec<Block> {
    let seed = req.cache_scope.unwrap_or(0);
    match (&req.messages, &req.prompt) {
        (Some(messages), _) => message_blocks(messages, seed),
        (None, Some(prompt)) => prompt_blocks(prompt, seed),
        (None, None) => Vec::new(),
    }
}

fn message_blocks(messages: &[ChatMessage], seed: u64) -> Vec<Block> {
    let mut out = Vec::with_capacity(messages.len().min(MAX_BLOCKS));
    let (mut prev, mut bytes) = (seed, 0u32);
    for m in messages.iter().take(MAX_BLOCKS) {
        let mut h = hasher();
        h.write_u64(prev);
        // Length-prefixed fields: no two messages hash the same text.
        for field in [m.role.as_str(), m.content.as_str()] {
            h.write_usize(field.len());
            h.write(field.as_bytes());
        }
        for call in &m.tool_calls {
            let json = serde_json::to_string(call).unwrap_or_default();
            h.write_usize(json.len());
            h.write(json.as_bytes());
        }
        if let Some(id) = &m.tool_call_id {
            h.write_usize(id.len());
            h.write(id.as_bytes());
        }
        prev = h.finish();
        bytes = bytes.saturating_add(u32::try_from(m.content.len()).unwrap_or(u32::MAX));
        out.push(Block { hash: prev, bytes });
    }
    out
}

fn prompt_blocks(prompt: &str, seed: u64) -> Vec<Block> {
    let mut out = Vec::new();
    let mut prev = seed;
    for (i, chunk) in prompt
        .as_bytes()
        .chunks(PROMPT_BLOCK)
        .take(MAX_BLOCKS)
        .enumerate()
    {
        let mut h = hasher();
        h.write_u64(prev);
        h.write(chunk);
        prev = h.finish();
        let bytes = (i * PROMPT_BLOCK + chunk.len())
            .try_into()
            .unwrap_or(u32::MAX);
        out.push(Block { hash: prev, bytes });
    }
    out
}

#[derive(Debug, Default)]
struct PoolPrefixes {
    /// Block hash -> (its bytes, when it was last placed here).
    blocks: HashMap<u64, (u32, u64)>,
}

/// Per pool, the prefix blocks of the requests placed there (by node id, then pool id, so a
/// lookup from placement's borrowed ids allocates nothing).
#[derive(Debug, Default)]
pub(crate) struct PrefixIndex {
    nodes: HashMap<String, HashMap<String, PoolPrefixes>>,
    clock: u64,
}

impl PrefixIndex {
    /// Bytes of `blocks` that `pool` probably holds: its deepest block placed there.
    pub(crate) fn expected(&self, node_id: &str, pool_id: &str, blocks: &[Block]) -> u32 {
        let Some(p) = self.nodes.get(node_id).and_then(|n| n.get(pool_id)) else {
            return 0;
        };
        blocks
            .iter()
            .rev()
            .find(|b| p.blocks.contains_key(&b.hash))
            .map_or(0, |b| b.bytes)
    }

    /// Records that a request with `blocks` was placed on `pool`.
    pub(crate) fn record(&mut self, pool: &PoolKey, blocks: &[Block]) {
        if blocks.is_empty() {
            return;
        }
        self.clock += 1;
        let now = self.clock;
        let p = self
            .nodes
            .entry(pool.0.clone())
            .or_default()
            .entry(pool.1.clone())
            .or_default();
        for b in blocks {
            p.blocks.insert(b.hash, (b.bytes, now));
        }
        if p.blocks.len() > BLOCKS_PER_POOL {
            // Forget the least recently placed quarter at once (amortized: not one scan a
            // request).
            let mut ages: Vec<u64> = p.blocks.values().map(|(_, t)| *t).collect();
            let cut = ages.len() - BLOCKS_PER_POOL * 3 / 4;
            let (_, nth, _) = ages.select_nth_unstable(cut);
            let nth = *nth;
            p.blocks.retain(|_, (_, t)| *t > nth);
        }
    }

    /// Forgets the pools `keep` says no to, given (node id, pool id): pools that stopped
    /// serving, whose engines restart with empty caches.
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&str, &str) -> bool) {
        self.nodes.retain(|node, pools| {
            pools.retain(|pool, _| keep(node, pool));
            !pools.is_empty()
        });
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    #[cfg(test)]
    fn held(&self, pool: &PoolKey) -> usize {
        self.nodes
            .get(&pool.0)
            .and_then(|n| n.get(&pool.1))
            .map_or(0, |p| p.blocks.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(messages: &[(&str, &str)]) -> GenerateRequest {
        GenerateRequest::chat(
            messages
                .iter()
                .map(|(r, c)| ChatMessage::new(*r, *c))
                .collect(),
        )
    }

    fn key(p: &str) -> PoolKey {
        ("n1".to_string(), p.to_string())
    }

    #[test]
    fn a_shared_system_prompt_and_a_resent_history_match_their_deepest_block() {
        let system = "You are a helpful assistant. ".repeat(40);
        let mut idx = PrefixIndex::default();
        let first = blocks(&chat(&[("system", &system), ("user", "hi")]));
        idx.record(&key("a"), &first);
        // Another user of the same system prompt: the system block matches.
        let other = blocks(&chat(&[("system", &system), ("user", "hello")]));
        assert_eq!(idx.expected("n1", "a", &other), system.len() as u32);
        assert_eq!(idx.expected("n1", "b", &other), 0, "never placed on b");
        // The conversation's next turn matches up to its last turn.
        let next = blocks(&chat(&[
            ("system", &system),
            ("user", "hi"),
            ("assistant", "Hello!"),
            ("user", "more"),
        ]));
        assert_eq!(idx.expected("n1", "a", &next), system.len() as u32 + 2);
        // Another system prompt matches nothing; nor does the same text in another role.
        let swapped = blocks(&chat(&[("user", &system), ("user", "hi")]));
        assert_eq!(idx.expected("n1", "a", &swapped), 0);
        idx.retain(|_, pool| pool != "a");
        assert_eq!(idx.expected("n1", "a", &other), 0, "forgotten");
    }

    #[test]
    fn raw_prompts_match_by_512_byte_blocks() {
        let mut idx = PrefixIndex::default();
        let doc = "x".repeat(1500);
        let req = |tail: &str| GenerateRequest {
            prompt: Some(format!("{doc}{tail}")),
            ..Default::default()
        };
        idx.record(&key("a"), &blocks(&req(" first")));
        assert_eq!(idx.expected("n1", "a", &blocks(&req(" second"))), 1024);
    }

    #[test]
    fn each_pool_keeps_a_bounded_number_of_blocks() {
        let mut idx = PrefixIndex::default();
        for i in 0..(BLOCKS_PER_POOL * 2) {
            let b = blocks(&chat(&[("user", &format!("question {i}"))]));
            idx.record(&key("a"), &b);
            assert!(idx.held(&key("a")) <= BLOCKS_PER_POOL);
        }
        // The newest is still there.
        let newest = blocks(&chat(&[(
            "user",
            &format!("question {}", BLOCKS_PER_POOL * 2 - 1),
        )]));
        assert!(idx.expected("n1", "a", &newest) > 0);
    }
}
