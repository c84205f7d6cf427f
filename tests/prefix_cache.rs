//! The engine's prefix cache past the slot (docs/ARCHITECTURE.md, "The prefix cache"), end to
//! end on the real default model: greedy answers from shared and restored prefixes equal cold
//! ones, a system prompt is computed once for four slots (one after another, or arriving
//! together), and the host cache keeps its bound.
//!
//! Each test holds `serial()` for its whole run, across awaits (see tests/engine.rs).
#![allow(clippy::await_holding_lock)]

use llorch_client::{Completion, UnixClient};
use llorch_tests::prom::Scrape;
use llorch_tests::{serial, Engine};
use llorch_wire::engine::{ChatMessage, GenerateRequest};

/// A system prompt of about 480 tokens, different for each `topic`.
fn system_prompt(topic: &str) -> String {
    let mut s = format!("You are a careful assistant for questions about {topic}. ");
    for i in 0..24 {
        s.push_str(&format!(
            "Rule {i}: answer about {topic} in plain words, keep it short and name your source. "
        ));
    }
    s
}

fn chat(system: &str, question: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ..GenerateRequest::chat(vec![
            ChatMessage::new("system", system),
            ChatMessage::new("user", question),
        ])
    }
}

async fn run(client: &UnixClient, req: &GenerateRequest) -> Completion {
    client.generate(req).await.unwrap().collect().await.unwrap()
}

async fn scrape(client: &UnixClient) -> Scrape {
    let (_, body) = client.get_bytes("/metrics").await.unwrap();
    Scrape::parse(std::str::from_utf8(&body).unwrap())
}

/// Greedy answers from reused cells agree with the cold answer. The cells hold the same values,
/// but the last prompt token is evaluated alone instead of in the prompt's batch, so where two
/// tokens are nearly tied greedy decoding may pick the other (docs/ARCHITECTURE.md, "Batching
/// and determinism"). Wrong cells (positions, another prompt) fail at once; so the first 8
/// pieces must be equal.
fn agrees(got: &Completion, cold: &Completion, how: &str) {
    let shared = got
        .tokens
        .iter()
        .zip(&cold.tokens)
        .take_while(|(a, b)| a == b)
        .count();
    eprintln!(
        "{how}: {:?}\ncold: {:?}\n{shared} pieces agree",
        got.text, cold.text
    );
    assert!(
        shared >= 8.min(cold.tokens.len()),
        "{how}: {:?} diverges early from the cold answer {:?}",
        got.text,
        cold.text
    );
}

/// The answer to `req` from a fresh engine, where nothing is cached.
async fn cold(req: &GenerateRequest) -> Completion {
    let engine = Engine::start(&["--slots", "2"]);
    let c = run(&engine.client(), req).await;
    assert_eq!(c.end.cached_tokens, 0);
    assert!(engine.stop().success());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_and_restored_prefixes_give_the_same_greedy_answers_as_cold_prompts() {
    let _serial = serial();
    let system = system_prompt("astronomy");
    let first = chat(&system, "What is a planet?", 24);
    let second = chat(&system, "What is a comet?", 24);
    let cold_first = cold(&first).await;
    let cold_second = cold(&second).await;

    let engine = Engine::start(&["--slots", "2"]);
    let client = engine.client();
    let a = run(
        &client,
        &GenerateRequest {
            slot: Some(0),
            ..first.clone()
        },
    )
    .await;
    assert_eq!(a.end.cached_tokens, 0);
    agrees(&a, &cold_first, "cold in both");

    // The second question in the other slot takes the system prompt from slot 0.
    let b = run(
        &client,
        &GenerateRequest {
            slot: Some(1),
            ..second.clone()
        },
    )
    .await;
    assert_eq!(b.end.slot, 1);
    assert!(
        b.end.cached_tokens * 10 >= b.end.prompt_tokens * 8,
        "the system prompt came from slot 0: {:?}",
        b.end
    );
    agrees(&b, &cold_second, "copied from slot 0");
    let m = scrape(&client).await;
    assert!(
        m.sum(
            "llorch_prefix_cache_hit_tokens_total",
            &[("source", "shared")]
        ) > 0.0
    );

    // Two other conversations push both out of the slots, into the host cache.
    for topic in ["botany", "geology"] {
        run(&client, &chat(&system_prompt(topic), "Say hello.", 4)).await;
    }
    let m = scrape(&client).await;
    assert!(
        m.sum("llorch_prefix_cache_entries", &[]) >= 1.0,
        "saved to the host cache"
    );

    // The first conversation again: restored from host memory, the same answer as cold.
    let again = run(&client, &first).await;
    assert_eq!(again.end.cached_tokens, again.end.prompt_tokens - 1);
    agrees(&again, &cold_first, "restored cells");
    let m = scrape(&client).await;
    assert!(
        m.sum(
            "llorch_prefix_cache_hit_tokens_total",
            &[("source", "host")]
        ) > 0.0
    );
    assert!(m.sum("llorch_prefix_cache_restored_bytes_total", &[]) > 0.0);
    assert!(engine.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_slots_with_one_system_prompt_compute_it_once() {
    let _serial = serial();
    let engine = Engine::start(&["--slots", "4"]);
    let client = engine.client();
    let system = system_prompt("cooking");
    let first = run(
        &client,
        &GenerateRequest {
            slot: Some(0),
            ..chat(&system, "How do I boil an egg?", 8)
        },
    )
    .await;
    let computed = || async {
        scrape(&client)
            .await
            .sum("llorch_engine_prompt_tokens_total", &[])
    };
    let before = computed().await;
    let questions = [
        "How do I fry rice?",
        "What is a roux?",
        "How long to bake bread?",
    ];
    let tasks: Vec<_> = questions
        .iter()
        .enumerate()
        .map(|(i, q)| {
            let client = client.clone();
            let req = GenerateRequest {
                slot: Some(i as u32 + 1),
                ..chat(&system, q, 8)
            };
            tokio::spawn(async move { run(&client, &req).await })
        })
        .collect();
    let mut slots = std::collections::BTreeSet::new();
    for t in tasks {
        let c = t.await.unwrap();
        slots.insert(c.end.slot);
        // Everything up to the question came from slot 0's cells.
        assert!(
            c.end.cached_tokens * 10 >= first.end.prompt_tokens * 8,
            "{:?}, first prompt {}",
            c.end,
            first.end.prompt_tokens
        );
    }
    assert_eq!(slots.len(), 3, "three slots of their own: {slots:?}");
    // The three computed only their questions (and the template around them), not the
    // system prompt again.
    let computed_now = computed().await - before;
    assert!(
        computed_now < f64::from(first.end.prompt_tokens),
        "{computed_now} prompt tokens computed for three requests sharing a {}-token prompt",
        first.end.prompt_tokens
    );
    assert!(engine.stop().success());
}

/// A system prompt of about 1,450 tokens: three steps of prefill (`BATCH_TOKENS` 512).
fn long_system_prompt() -> String {
    ["maps", "ships", "roads"].map(system_prompt).concat()
}

/// Requests that arrive together with one new system prompt compute it once: the first
/// computes it, the others wait for its cells and copy them (`prefix::wait_for`) instead of
/// splitting every batch between four copies of the same work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_requests_arriving_together_compute_a_new_system_prompt_once() {
    let _serial = serial();
    // About 1,450 tokens: three steps of prefill, so all four arrive while it is computed.
    let system = long_system_prompt();
    let questions = [
        "How do I plant tomatoes?",
        "When do I prune roses?",
        "What is compost?",
        "How often do I water basil?",
    ];
    let reference = cold(&chat(&system, questions[2], 8)).await;
    let engine = Engine::start(&["--slots", "4"]);
    let client = engine.client();
    // All four are admitted before the loop's next step: their streams are open first.
    let mut streams = Vec::new();
    for (i, q) in questions.iter().enumerate() {
        let req = GenerateRequest {
            slot: Some(i as u32),
            ..chat(&system, q, 8)
        };
        streams.push(client.generate(&req).await.unwrap());
    }
    let mut answers = Vec::new();
    for s in streams {
        answers.push(s.collect().await.unwrap());
    }
    let m = scrape(&client).await;
    let computed = m.sum("llorch_engine_prompt_tokens_total", &[]);
    let prompt = f64::from(answers[0].end.prompt_tokens);
    let copied = answers
        .iter()
        .filter(|c| c.end.cached_tokens * 10 >= c.end.prompt_tokens * 8)
        .count();
    eprintln!(
        "computed {computed} prompt tokens for four prompts of about {prompt}; waits {}",
        m.sum("llorch_prefix_cache_waits_total", &[])
    );
    assert_eq!(
        copied, 3,
        "three of four take the system prompt from the first"
    );
    // Once: one whole prompt and three questions (each well under 100 tokens with its
    // template), where side by side it would be nearly four whole prompts.
    assert!(
        computed < prompt + 300.0,
        "{computed} prompt tokens computed for four requests sharing a {prompt}-token prompt"
    );
    agrees(&answers[2], &reference, "arrived together");
    assert!(engine.stop().success());
}

/// A request waiting for another slot's prefix is not stranded when that slot's client goes
/// away mid-prompt: it takes what was computed and computes the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_request_finishes_when_the_slot_it_waits_for_is_cancelled() {
    let _serial = serial();
    // Three steps of prefill, so the second request arrives during them.
    let system = long_system_prompt();
    let req = |slot: u32, q: &str| GenerateRequest {
        slot: Some(slot),
        ..chat(&system, q, 8)
    };
    let reference = cold(&req(0, "Which way is north?")).await;
    let engine = Engine::start(&["--slots", "2"]);
    let client = engine.client();
    let first = client
        .generate(&req(0, "What is a compass?"))
        .await
        .unwrap();
    let second = client
        .generate(&req(1, "Which way is north?"))
        .await
        .unwrap();
    drop(first);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(120), second.collect())
        .await
        .expect("the waiting request finished")
        .unwrap();
    let m = scrape(&client).await;
    eprintln!(
        "{:?}; waits {}",
        answer.end,
        m.sum("llorch_prefix_cache_waits_total", &[])
    );
    assert_eq!(m.sum("llorch_prefix_cache_waits_total", &[]), 1.0);
    agrees(&answer, &reference, "after its donor was cancelled");
    assert!(engine.stop().success());
}

/// Only a computation of the request's own scope is waited for: a request of another API key
/// that arrives while one key's system prompt is computed computes it itself (waiting would
/// let it learn, from its time to first token, that the other key sent that prompt just now).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_never_waits_for_another_scopes_prompt() {
    let _serial = serial();
    let system = long_system_prompt();
    let engine = Engine::start(&["--slots", "2"]);
    let client = engine.client();
    let req = |slot: u32, scope: u64| GenerateRequest {
        slot: Some(slot),
        cache_scope: Some(scope),
        ..chat(&system, "Which way is north?", 4)
    };
    let a = client.generate(&req(0, 1)).await.unwrap();
    let b = client.generate(&req(1, 2)).await.unwrap();
    let (a, b) = (a.collect().await.unwrap(), b.collect().await.unwrap());
    let m = scrape(&client).await;
    assert_eq!(m.sum("llorch_prefix_cache_waits_total", &[]), 0.0);
    assert_eq!((a.end.cached_tokens, b.end.cached_tokens), (0, 0));
    assert!(engine.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_cache_stays_within_its_bound_by_evicting_the_least_recently_used() {
    let _serial = serial();
    // About 500 tokens of 23,040 bytes each: some 11 MiB a state, so 24 MiB holds two.
    let engine = Engine::start(&["--slots", "1", "--prefix-cache-mib", "24"]);
    let client = engine.client();
    let limit = 24.0 * 1024.0 * 1024.0;
    let topics = ["rivers", "birds", "trains", "music", "chess", "tea"];
    for topic in topics {
        run(&client, &chat(&system_prompt(topic), "Hi.", 2)).await;
        let m = scrape(&client).await;
        assert_eq!(m.sum("llorch_prefix_cache_limit_bytes", &[]), limit);
        let held = m.sum("llorch_prefix_cache_bytes", &[]);
        assert!(held <= limit, "{held} bytes held over a {limit} bound");
    }
    let m = scrape(&client).await;
    let entries = m.sum("llorch_prefix_cache_entries", &[]);
    let evictions = m.sum("llorch_prefix_cache_evictions_total", &[]);
    assert!((1.0..=2.0).contains(&entries), "{entries} entries");
    // Five states were saved (the last stays in the slot); at most two fit.
    assert!(evictions >= 3.0, "{evictions} evictions");
    // The oldest was evicted: its prompt is computed again; the newest saved one is restored.
    let oldest = run(&client, &chat(&system_prompt("rivers"), "Hi.", 2)).await;
    assert!(
        oldest.end.cached_tokens * 2 < oldest.end.prompt_tokens,
        "{:?}",
        oldest.end
    );
    let recent = run(&client, &chat(&system_prompt("tea"), "Hi.", 2)).await;
    assert!(
        recent.end.cached_tokens * 10 >= recent.end.prompt_tokens * 8,
        "{:?}",
        recent.end
    );
    // The engine's peak resident memory stays inside the MemoryMax pool-managerd gives its
    // unit for these settings (1 slot of the default 2,048 tokens, a 24 MiB host cache).
    let peak = peak_rss(engine.child.id());
    let model = llorch_tests::model_path();
    let info = llorch_gguf::inspect(&model).unwrap();
    let pool: pool_managerd::config::PoolConfig = toml::from_str(&format!(
        "id = \"p\"\nslots = 1\nctx = 2048\n[model]\nid = \"m\"\nsource = \"{}\"\n",
        model.display()
    ))
    .unwrap();
    let bound = pool_managerd::launcher::engine_memory_bound(
        &pool,
        std::fs::metadata(&model).unwrap().len(),
        info.kv_bytes_per_token(),
        24 << 20,
    )
    .unwrap();
    eprintln!(
        "engine VmHWM {} MiB, MemoryMax {} MiB",
        peak >> 20,
        bound >> 20
    );
    assert!(
        peak < bound,
        "peak RSS {peak} over the unit's bound {bound}"
    );
    assert!(engine.stop().success());
}

/// A process's peak resident set (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kib * 1024
}

/// A native chat task of `system` and `question`, run to its end: (pool, end event).
async fn placed_chat(
    client: &llorch_client::HttpClient,
    system: &str,
    question: &str,
    pin: Option<&str>,
) -> (String, llorch_wire::task::TaskEnd) {
    use llorch_wire::task::{PlacementHints, TaskAccepted, TaskInfo, TaskRequest};
    let req = TaskRequest {
        model_ref: llorch_tests::stack::MODEL_ID.into(),
        messages: Some(vec![
            ChatMessage::new("system", system),
            ChatMessage::new("user", question),
        ]),
        max_tokens: Some(2),
        temperature: Some(0.0),
        placement: pin.map(|p| PlacementHints {
            pin_pool_id: Some(p.into()),
            ..PlacementHints::default()
        }),
        ..TaskRequest::default()
    };
    let accepted: TaskAccepted = client.post_json("/v2/tasks", &req).await.unwrap();
    let frames = llorch_tests::frames(client.events(&accepted.streams.sse).await.unwrap()).await;
    let end = frames
        .iter()
        .find(|f| f.event == "end")
        .unwrap_or_else(|| panic!("no end event in {frames:?}"));
    let end = serde_json::from_str(&end.data).unwrap();
    let info: TaskInfo = client
        .get_json(&format!("/v2/tasks/{}", accepted.task_id))
        .await
        .unwrap();
    (info.pool_id.expect("the task ran on a pool"), end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_sends_a_shared_system_prompt_to_the_pool_that_holds_it() {
    use llorch_tests::stack::{Stack, StackOptions};
    let _serial = serial();
    // Two idle pools of the model with 3 slots each: by free slots alone every task would go to
    // `default` (the smaller id wins a tie).
    let second = format!(
        "\n[[pools]]\nid = \"second\"\nslots = 3\nctx = 1024\nthreads = 1\n\n[pools.model]\nid = \"{}\"\nsource = \"{}\"\n",
        llorch_tests::stack::MODEL_ID,
        llorch_tests::model_path().display()
    );
    let mut stack = Stack::start(StackOptions {
        slots: 3,
        api_keys: false,
        extra_node_toml: second,
        ..StackOptions::default()
    });
    stack.wait_ready();
    let client = stack.client();
    llorch_tests::wait_until(
        "both pools ready",
        std::time::Duration::from_secs(120),
        || async {
            let p: llorch_wire::task::PoolsAnswer = client
                .get_json("/v2/pools")
                .await
                .map_err(|e| e.to_string())?;
            let ready = p
                .pools
                .iter()
                .filter(|p| p.state == llorch_wire::node::PoolState::Ready)
                .count();
            if ready == 2 {
                Ok(())
            } else {
                Err(format!("{ready} pools ready"))
            }
        },
    )
    .await;
    let system = system_prompt("sailing");
    // The first user of the system prompt is pinned to `second`, which then holds it.
    let (pool, first) = placed_chat(&client, &system, "What is a jib?", Some("second")).await;
    assert_eq!(pool, "second");
    assert!(first.cached_tokens * 2 < first.tokens_in, "{first:?}");
    // Later users go there for it and compute only their question.
    for q in ["What is a keel?", "How do I tack?", "What is a boom?"] {
        let (pool, end) = placed_chat(&client, &system, q, None).await;
        assert_eq!(pool, "second", "placed for the cached system prompt");
        assert!(end.cached_tokens * 10 >= end.tokens_in * 8, "{end:?}");
    }
    // Another system prompt has no cache anywhere: free slots decide (a tie: `default`).
    let (pool, _) = placed_chat(&client, &system_prompt("knitting"), "Hi?", None).await;
    assert_eq!(pool, "default");
    // The load rule (docs/ARCHITECTURE.md, "Cache-aware placement"): a pool keeps the bonus
    // while it runs at most its share of the running tasks plus one, `busy x 6 <= 3 x (all
    // busy + 1)` here. With one long task on `second` it still gets the system prompt, though
    // `default` has more free slots...
    let first_hold = hold(&client, "second").await;
    let (pool, _) = placed_chat(&client, &system, "What is a mast?", None).await;
    assert_eq!(pool, "second", "one task running: within its share");
    // ...with two (12 > 9) it has a free slot but loses the bonus, and free slots decide.
    let second_hold = hold(&client, "second").await;
    let (pool, end) = placed_chat(&client, &system, "What is a hull?", None).await;
    assert_eq!(pool, "default", "two of three slots busy: past its share");
    assert!(end.cached_tokens * 2 < end.tokens_in, "{end:?}");
    for (id, _stream) in [first_hold, second_hold] {
        let (status, _, v) = llorch_tests::post(
            &client,
            &format!("/v2/tasks/{id}/cancel"),
            &serde_json::json!({}),
        )
        .await;
        assert!(status.is_success(), "{status} {v}");
    }
}

/// Starts a long task pinned to `pool` and returns its id and stream once its first token is
/// out: its slot is busy until it is cancelled.
async fn hold(
    client: &llorch_client::HttpClient,
    pool: &str,
) -> (String, llorch_client::EventStream) {
    use llorch_wire::task::{PlacementHints, TaskAccepted, TaskRequest};
    let req = TaskRequest {
        model_ref: llorch_tests::stack::MODEL_ID.into(),
        prompt: Some("Count slowly:".into()),
        max_tokens: Some(900),
        ignore_eos: true,
        placement: Some(PlacementHints {
            pin_pool_id: Some(pool.into()),
            ..PlacementHints::default()
        }),
        ..TaskRequest::default()
    };
    let accepted: TaskAccepted = client.post_json("/v2/tasks", &req).await.unwrap();
    let mut stream = client.events(&accepted.streams.sse).await.unwrap();
    loop {
        let frame = stream.next_frame().await.expect("a token").unwrap();
        assert_ne!(frame.event, "end", "the long task ended early");
        if frame.event == "token" {
            return (accepted.task_id, stream);
        }
    }
}

/// One API key cannot probe another's prompts through the cache: what key A's system prompt
/// left in the pool is reused for A (its `cached_tokens` say so) and never for key B, who sees
/// `cached_tokens: 0` for the same prompt and pays for all of it, as if nothing were cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_key_never_reuses_or_sees_another_keys_cached_prompt() {
    use llorch_tests::stack::{Stack, StackOptions, TEST_KEY};
    let _serial = serial();
    let stack = Stack::start(StackOptions {
        slots: 2,
        ..StackOptions::default()
    });
    let a = stack.client();
    let b = llorch_client::HttpClient::new(&stack.url())
        .unwrap()
        .with_token(Some("other-key-0123456789abcdef".into()));
    let _ = TEST_KEY;
    let system = system_prompt("a secret project");
    let (_, first) = placed_chat(&a, &system, "What is the plan?", None).await;
    assert!(first.cached_tokens * 2 < first.tokens_in, "{first:?}");
    let (_, again) = placed_chat(&a, &system, "Who leads it?", None).await;
    assert!(
        again.cached_tokens * 10 >= again.tokens_in * 8,
        "A reuses its own: {again:?}"
    );
    // B sends A's system prompt: nothing of it is reused (both slots and the host cache hold
    // it for A by now).
    let (_, probe) = placed_chat(&b, &system, "Who leads it?", None).await;
    assert_eq!(
        probe.cached_tokens, 0,
        "B learned that A sent it: {probe:?}"
    );
    // B's own repeat is reused for B.
    let (_, own) = placed_chat(&b, &system, "When is it due?", None).await;
    assert!(
        own.cached_tokens * 10 >= own.tokens_in * 8,
        "B reuses its own: {own:?}"
    );
}
