//! End-to-end tests of `llorch-engine` on the real default model: the real binary, its real
//! Unix socket, and a client that talks HTTP to it.
//!
//! Each test holds `serial()` for its whole run, across awaits: the guard serializes whole tests
//! (each with its own runtime), so no task of one runtime ever waits on it.
#![allow(clippy::await_holding_lock)]

use std::time::Duration;

use http_body_util::BodyExt;
use llorch_client::{ClientError, StreamFailure};
use llorch_tests::{bin, model_path, serial, wait_for, wait_until, Engine, UnixClient};
use llorch_wire::engine::{
    ChatMessage, EngineEvent, FinishReason, GenerateRequest, HealthState, SlotState,
};
use llorch_wire::handoff::Handoff;
use llorch_wire::ErrorCode;

fn user(text: &str) -> ChatMessage {
    ChatMessage::new("user", text)
}

fn greedy_chat(question: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        temperature: Some(0.0),
        max_tokens: Some(max_tokens),
        ..GenerateRequest::chat(vec![user(question)])
    }
}

/// A request that generates exactly `n` tokens whatever the model says.
fn long_request(n: u32) -> GenerateRequest {
    GenerateRequest {
        ignore_eos: true,
        ..greedy_chat("Tell me a long story about a lighthouse keeper.", n)
    }
}

async fn status_and_error(client: &UnixClient, body: &str) -> (u16, serde_json::Value) {
    let resp = client
        .post_raw("/generate", body.to_string())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn greedy_answers_are_english_repeatable_and_reuse_the_prompt_cache() {
    let _serial = serial();
    let engine = Engine::start(&[]);
    let handoff: Handoff =
        serde_json::from_slice(&std::fs::read(&engine.handoff).unwrap()).unwrap();
    assert_eq!(handoff.pool_id, "p0");
    assert_eq!(handoff.slots, 4);
    assert_eq!(handoff.pid, engine.child.id());
    assert_eq!(handoff.socket, engine.socket.display().to_string());
    let client = engine.client();
    let (status, health) = client.health().await.unwrap();
    assert_eq!((status.as_u16(), health.status), (200, HealthState::Ready));

    let req = greedy_chat("What city is the capital of France?", 32);
    let first = client
        .generate(&req)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(first.text.contains("Paris"), "{:?}", first.text);
    assert_eq!(first.end.finish_reason, FinishReason::Stop);
    assert_eq!(first.end.cached_tokens, 0);
    // Every token event carries at least one token's text.
    assert!(first.end.completion_tokens as usize >= first.tokens.len() && !first.tokens.is_empty());

    // The same request again: the same text, and the whole prompt but its last token came
    // from the slot's KV cache.
    let again = client
        .generate(&GenerateRequest {
            slot: Some(first.end.slot),
            ..req.clone()
        })
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(again.text, first.text);
    assert_eq!(again.end.slot, first.end.slot);
    assert_eq!(again.end.cached_tokens, again.end.prompt_tokens - 1);

    // A follow-up turn pays only for the new turn: the slot is found by its shared prefix.
    let follow = GenerateRequest {
        temperature: Some(0.0),
        max_tokens: Some(24),
        ..GenerateRequest::chat(vec![
            user("What city is the capital of France?"),
            ChatMessage::new("assistant", first.text.clone()),
            user("And of Italy?"),
        ])
    };
    let second = client
        .generate(&follow)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(second.end.slot, first.end.slot);
    assert!(
        second.end.cached_tokens >= first.end.prompt_tokens,
        "{:?} vs first prompt {}",
        second.end,
        first.end.prompt_tokens
    );
    assert!(second.text.contains("Rome"), "{:?}", second.text);

    // A fresh process gives the same greedy answer.
    assert!(engine.stop().success());
    let engine = Engine::start(&[]);
    let fresh = engine
        .client()
        .generate(&req)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(fresh.text, first.text);
    assert!(engine.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_requests_complete_and_agree_with_their_solo_answers() {
    let _serial = serial();
    let engine = Engine::start(&[]);
    let client = engine.client();
    let questions = [
        "What city is the capital of France?",
        "Name three primary colors.",
        "What do bees make?",
        "How many legs does a spider have?",
    ];
    // Solo answers, one after another.
    let mut solo = Vec::new();
    for q in &questions {
        let c = client
            .generate(&greedy_chat(q, 40))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        solo.push(c);
    }
    // All four at once on a fresh engine, so no cache (slot, shared or host) holds a prompt:
    // each goes to its own slot, the prompts evaluated in shared batches.
    assert!(engine.stop().success());
    let engine = Engine::start(&[]);
    let client = engine.client();
    // Decode steps that held more than one sequence, from the engine's batch-size histogram.
    let shared_steps = || async {
        let (_, body) = client.get_bytes("/metrics").await.unwrap();
        let scrape = llorch_tests::prom::Scrape::parse(std::str::from_utf8(&body).unwrap());
        scrape.sum("llorch_engine_batch_size_count", &[])
            - scrape.sum("llorch_engine_batch_size_bucket", &[("le", "1")])
    };
    let shared_before = shared_steps().await;
    let tasks: Vec<_> = questions
        .iter()
        .map(|q| {
            let client = client.clone();
            let req = greedy_chat(q, 40);
            tokio::spawn(async move {
                client
                    .generate(&req)
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut together = Vec::new();
    for t in tasks {
        together.push(t.await.unwrap());
    }
    // At most the chat template's opening can come from another slot's cells.
    for t in &together {
        assert!(t.end.cached_tokens < t.end.prompt_tokens - 1, "{:?}", t.end);
    }
    let slots: std::collections::HashSet<u32> = together.iter().map(|c| c.end.slot).collect();
    assert_eq!(slots.len(), 4, "each request had its own slot");
    // Own slots alone would pass with an engine that serves them one after another: the
    // engine must really have decoded them together, many steps with several sequences.
    let shared = shared_steps().await - shared_before;
    eprintln!("decode steps with several sequences: {shared}");
    assert!(
        shared >= 20.0,
        "only {shared} decode steps held more than one sequence"
    );
    // Batched and solo decoding run different matrix shapes, so llama.cpp does not promise
    // bit-identical logits; greedy decoding can then pick another token where two are nearly
    // tied. We require every answer to agree with its solo answer on its first tokens and
    // most answers to agree entirely (docs/ARCHITECTURE.md, "Batching and determinism").
    let mut identical = 0;
    for (s, t) in solo.iter().zip(&together) {
        let shared = s
            .tokens
            .iter()
            .zip(&t.tokens)
            .take_while(|(a, b)| a == b)
            .count();
        eprintln!(
            "solo {:?}\nbatched {:?}\nshared {shared} of {}",
            s.text,
            t.text,
            s.tokens.len()
        );
        // The first 6 pieces: a mix-up (another sequence's token, a wrong position) shows at
        // once, while a short answer's closing piece ("." against ",") may be a near-tie.
        assert!(
            shared >= 6.min(s.tokens.len()),
            "answers diverge early: {:?} vs {:?}",
            s.text,
            t.text
        );
        if s.text == t.text {
            identical += 1;
        }
    }
    assert!(
        identical >= 3,
        "only {identical} of 4 batched answers equal their solo answers"
    );
    let status = client.slots().await.unwrap();
    assert_eq!(status.busy, 0);
    assert!(engine.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_one_stream_frees_its_slot_while_the_others_continue() {
    let _serial = serial();
    let engine = Engine::start(&[]);
    let client = engine.client();
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(client.generate(&long_request(400)).await.unwrap());
    }
    // Read a few tokens from each, so all three are decoding.
    for s in &mut streams {
        for _ in 0..3 {
            assert!(matches!(
                s.next_event().await,
                Some(Ok(EngineEvent::Token(_)))
            ));
        }
    }
    assert_eq!(client.slots().await.unwrap().busy, 3);
    let cancelled = streams.remove(0);
    drop(cancelled);
    let c = &client;
    wait_until(
        "the dropped stream's slot to be freed",
        Duration::from_secs(1),
        || async move {
            let status = c.slots().await.unwrap();
            (status.busy == 2)
                .then_some(())
                .ok_or(format!("{status:?}"))
        },
    )
    .await;
    // The other two are still running and finish normally with all their tokens.
    for s in streams {
        let done = s.collect().await.unwrap();
        assert_eq!(done.end.completion_tokens, 400);
        assert_eq!(done.end.finish_reason, FinishReason::Length);
    }
    let status = client.slots().await.unwrap();
    assert_eq!(status.busy, 0);
    assert!(status.slots.iter().all(|s| s.state == SlotState::Idle));
    assert!(engine.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_engine_answers_503_with_retry_after_instead_of_queueing() {
    let _serial = serial();
    let engine = Engine::start(&["--slots", "1"]);
    let client = engine.client();
    let mut running = client.generate(&long_request(300)).await.unwrap();
    assert!(matches!(
        running.next_event().await,
        Some(Ok(EngineEvent::Token(_)))
    ));
    match client.generate(&greedy_chat("Hi", 4)).await {
        Err(ClientError::Status {
            status,
            body: Some(body),
            retry_after: Some(retry),
            ..
        }) => {
            assert_eq!(status.as_u16(), 503);
            assert_eq!(body.code, ErrorCode::PoolUnavailable);
            assert!(body.retriable);
            assert!(retry.parse::<u64>().unwrap() >= 1);
        }
        Err(other) => panic!("expected a typed 503, got {other}"),
        Ok(_) => panic!("expected a typed 503, got a stream"),
    }
    drop(running);
    // The cancelled stream's slot is free within one decode step; then the engine serves again.
    let c = &client;
    wait_until(
        "the cancelled stream's slot to be freed",
        Duration::from_secs(1),
        || async move {
            let status = c.slots().await.unwrap();
            (status.busy == 0)
                .then_some(())
                .ok_or(format!("{status:?}"))
        },
    )
    .await;
    let ok = client
        .generate(&greedy_chat("Hi", 4))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(ok.end.completion_tokens > 0);
    assert!(engine.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_a_400_naming_the_field_and_disturb_no_one() {
    let _serial = serial();
    let engine = Engine::start(&["--ctx", "512"]);
    let client = engine.client();
    // A stream in flight while bad requests arrive.
    let mut running = client.generate(&long_request(120)).await.unwrap();
    assert!(matches!(
        running.next_event().await,
        Some(Ok(EngineEvent::Token(_)))
    ));

    let too_long = serde_json::json!({ "prompt": "lighthouse ".repeat(800) }).to_string();
    let cases: Vec<(&str, u16, &str)> = vec![
        (r#"{"prompt": "Hi", "max_tokens": 5"#, 400, "body"),
        (r#"not json"#, 400, "body"),
        (r#"{"prompt": "Hi", "max_tokenz": 5}"#, 400, "max_tokenz"),
        (
            r#"{"prompt": "Hi", "max_tokens": "five"}"#,
            400,
            "max_tokens",
        ),
        (r#"{"prompt": "Hi", "temperature": 7}"#, 400, "temperature"),
        (r#"{"prompt": "Hi", "top_p": 0}"#, 400, "top_p"),
        (r#"{"prompt": "Hi", "slot": 9}"#, 400, "slot"),
        (
            r#"{"messages": [{"role": "robot", "content": "Hi"}]}"#,
            400,
            "messages[0].role",
        ),
        (
            r#"{"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}]}"#,
            400,
            "messages",
        ),
        (r#"{}"#, 400, "prompt"),
        (&too_long, 400, "prompt"),
    ];
    for (body, want_status, want_field) in cases {
        let (status, err) = status_and_error(&client, body).await;
        assert_eq!(status, want_status, "{body:.80}: {err}");
        assert_eq!(err["code"], "INVALID_PARAMS", "{body:.80}: {err}");
        assert_eq!(err["field"], want_field, "{body:.80}: {err}");
        assert!(
            err["message"]
                .as_str()
                .unwrap()
                .contains(want_field.split('[').next().unwrap())
                || want_field == "body",
            "{err}"
        );
    }
    // A grammar nested deeper than llama.cpp's recursive parser survives: refused before it.
    let nested = serde_json::json!({
        "prompt": "Hi",
        "grammar": format!("root ::= {}\"a\"{}", "(".repeat(20_000), ")".repeat(20_000)),
    })
    .to_string();
    let (status, err) = status_and_error(&client, &nested).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["field"], "grammar", "{err}");
    // The deepest chain of rules a grammar may hold is parsed and advanced on threads with
    // room for it: the answer follows it.
    let chain: String = (0..1000)
        .map(|i| format!("r{i} ::= r{}\n", i + 1))
        .chain(["r1000 ::= \"ok\"\nroot ::= r0\n".to_string()])
        .collect();
    let req = serde_json::json!({"prompt": "Hi", "grammar": chain, "max_tokens": 4}).to_string();
    let resp = client.post_raw("/generate", req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let text =
        String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned();
    assert!(text.contains("event: end"), "{text:.500}");
    let (_, err) = status_and_error(&client, &too_long).await;
    assert!(err["message"].as_str().unwrap().contains("512"), "{err}");
    // Just over the 4 MiB limit: the engine answers 413 without reading the rest, and a rest
    // that fits the socket's buffer lets the client finish writing and read the answer (a much
    // larger body races the server's close and the client sees a broken pipe instead).
    let huge = format!(r#"{{"prompt": "{}"}}"#, "a".repeat((4 << 20) + 1024));
    let (status, err) = status_and_error(&client, &huge).await;
    assert_eq!(status, 413, "{err}");

    // The stream that was running is intact, and the engine still serves.
    let done = running.collect().await.unwrap();
    assert_eq!(done.end.completion_tokens, 120);
    let ok = client
        .generate(&greedy_chat("What city is the capital of France?", 16))
        .await
        .unwrap();
    assert!(ok.collect().await.unwrap().text.contains("Paris"));
    assert!(engine.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_end_generation_and_are_never_sent() {
    let _serial = serial();
    let engine = Engine::start(&[]);
    let client = engine.client();
    let plain = client
        .generate(&greedy_chat("What city is the capital of France?", 32))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let at = plain.text.find("Paris").expect("the model names Paris");
    let stopped = client
        .generate(&GenerateRequest {
            stop: vec!["aris".into()],
            ..greedy_chat("What city is the capital of France?", 32)
        })
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_eq!(stopped.text, format!("{}P", &plain.text[..at]));
    assert_eq!(stopped.end.finish_reason, FinishReason::Stop);
    assert!(engine.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_streams_finish_then_removes_the_handoff_and_socket() {
    let _serial = serial();
    let engine = Engine::start(&["--grace", "30"]);
    let client = engine.client();
    let stream = client.generate(&long_request(60)).await.unwrap();
    engine.terminate();
    // New work is refused while draining...
    wait_for("draining", Duration::from_secs(5), || {
        std::fs::read_to_string(&engine.log)
            .unwrap_or_default()
            .contains("Stopping.")
    });
    match client.generate(&greedy_chat("Hi", 4)).await {
        Err(ClientError::Status { status, .. }) => assert_eq!(status.as_u16(), 503),
        Err(ClientError::Connect { .. }) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a draining engine accepted new work"),
    }
    // ...and the stream in flight completes.
    let done = stream.collect().await.unwrap();
    assert_eq!(done.end.completion_tokens, 60);
    let mut engine = engine;
    let status = engine.child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(!engine.handoff.exists());
    assert!(!engine.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_grace_period_streams_end_with_a_canceled_event() {
    let _serial = serial();
    let engine = Engine::start(&["--grace", "0"]);
    let client = engine.client();
    let mut stream = client.generate(&long_request(1000)).await.unwrap();
    assert!(matches!(
        stream.next_event().await,
        Some(Ok(EngineEvent::Token(_)))
    ));
    let status = engine.stop();
    assert!(status.success(), "{status}");
    match stream.collect().await {
        Err(StreamFailure::Event(body)) => assert_eq!(body.code, ErrorCode::Canceled),
        other => panic!("expected a CANCELED event, got {other:?}"),
    }
}

#[test]
fn bad_model_files_and_configuration_end_the_process_with_a_clear_message() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let run = |model: &std::path::Path, extra: &[&str]| {
        let out = std::process::Command::new(bin("llorch-engine"))
            .arg("--model")
            .arg(model)
            .arg("--socket")
            .arg(dir.path().join("e.sock"))
            .arg("--handoff-dir")
            .arg(dir.path().join("h"))
            .args(extra)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let missing = dir.path().join("missing.gguf");
    let (code, err) = run(&missing, &[]);
    assert_eq!(code, Some(66), "{err}");
    assert!(
        err.contains("missing.gguf") && err.contains("does not exist"),
        "{err}"
    );

    let truncated = dir.path().join("truncated.gguf");
    let real = std::fs::read(model_path()).unwrap();
    std::fs::write(&truncated, &real[..real.len() / 3]).unwrap();
    let (code, err) = run(&truncated, &[]);
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("truncated.gguf is truncated"), "{err}");

    let text = dir.path().join("readme.gguf");
    std::fs::write(&text, "# not a model\n").unwrap();
    let (code, err) = run(&text, &[]);
    assert_eq!(code, Some(65), "{err}");
    assert!(err.contains("readme.gguf is not a GGUF file"), "{err}");

    let (code, err) = run(&model_path(), &["--slots", "0"]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("slots"), "{err}");

    // None of them left a socket or handoff file behind.
    assert!(!dir.path().join("e.sock").exists());
    assert!(!dir.path().join("h").exists());

    let (code, out) = run(&model_path(), &["--check-config"]);
    assert_eq!(code, Some(0), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_activated_engine_serves_on_the_inherited_socket() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let handoff = dir.path().join("handoff/act.json");
    // systemd-socket-activate holds the listening socket and starts the engine on the first
    // connection, passing the socket as LISTEN_FDS=1, as systemd does.
    let mut activator = std::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg(bin("llorch-engine"))
        .arg("--model")
        .arg(model_path())
        .arg("--socket")
        .arg(dir.path().join("unused.sock"))
        .arg("--handoff-dir")
        .arg(dir.path().join("handoff"))
        .args(["--pool", "act", "--threads", "2"])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (package systemd) is installed by scripts/setup.sh");
    wait_for("the activation socket", Duration::from_secs(10), || {
        socket.exists()
    });
    assert!(
        !handoff.exists(),
        "the engine starts only on the first connection"
    );
    // The first request waits in the socket's backlog while the engine starts.
    let client = UnixClient::new(&socket);
    let (_, health) = client.health().await.unwrap();
    assert!(matches!(
        health.status,
        HealthState::Loading | HealthState::Ready
    ));
    wait_for("the handoff file", Duration::from_secs(30), || {
        handoff.exists()
    });
    let answer = client
        .generate(&greedy_chat("What city is the capital of France?", 16))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert!(answer.text.contains("Paris"));
    assert!(
        !dir.path().join("unused.sock").exists(),
        "the engine bound nothing itself"
    );
    let pid = activator.id() as libc::pid_t;
    // SAFETY: signalling the child this test spawned; systemd-socket-activate execs the engine
    // in place, so this is the engine's pid.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    assert!(activator.wait().unwrap().success());
    assert!(!handoff.exists());
}

/// The MiB llama.cpp's log line ending in `what = N MiB` gives (the first such line).
fn llama_mib(log: &str, what: &str) -> f64 {
    log.lines()
        .find_map(|l| {
            let (_, after) = l.split_once(what)?;
            after
                .trim_start()
                .strip_prefix('=')?
                .trim()
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {what:?} line in the engine's log:\n{log}"))
}

#[test]
fn the_memory_estimate_covers_what_llama_cpp_allocates_for_the_default_model() {
    let _serial = serial();
    let info = llorch_gguf::inspect(&model_path()).unwrap();
    for (slots, ctx) in [(4u32, 2048u32), (1, 8192), (8, 512)] {
        let (s, c) = (slots.to_string(), ctx.to_string());
        let mut engine =
            Engine::spawn_logging(&model_path(), &["--slots", &s, "--ctx", &c], "info");
        engine.wait_ready();
        let log = engine.log_text();
        let _ = engine.stop();
        let weights = llama_mib(&log, "CPU_Mapped model buffer size");
        let kv = llama_mib(&log, "CPU KV buffer size");
        let compute = llama_mib(&log, "CPU compute buffer size");
        let e = llorch_gguf::memory::estimate(
            &info,
            llorch_gguf::memory::Request {
                slots,
                ctx_per_slot: ctx,
                gpu_layers: 0,
                ubatch: 512,
            },
        )
        .unwrap();
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        // Weights and KV exactly (to llama.cpp's two decimals); the compute buffer from
        // above, by at most 5%.
        assert!(
            (mib(e.cpu_weights) - weights).abs() < 0.01,
            "weights {} vs {weights}",
            mib(e.cpu_weights)
        );
        assert!(
            (mib(e.cpu_kv) - kv).abs() < 0.01,
            "KV {} vs {kv}",
            mib(e.cpu_kv)
        );
        let ratio = mib(e.compute) / compute;
        assert!(
            (1.0..1.05).contains(&ratio),
            "{slots}x{ctx}: compute {} vs llama.cpp's {compute}",
            mib(e.compute)
        );
        // The engine logs the same estimate before it loads.
        assert!(log.contains("Memory estimate: GPU 0.00 MiB"), "{log}");
    }
}

#[test]
fn the_gpu_smoke_script_passes_its_cpu_dry_run_and_build_cuda_refuses_bad_archs() {
    let _serial = serial();
    // scripts/gpu-smoke.sh is run for real only on a GPU machine; its --cpu dry run goes
    // through the same steps (start, stream, parse llama.cpp's buffers and the estimate).
    let out = std::process::Command::new("bash")
        .arg(llorch_tests::repo_root().join("scripts/gpu-smoke.sh"))
        .arg("--cpu")
        .env("ENGINE", bin("llorch-engine"))
        .env("MODEL", model_path())
        .env("TOKENS", "32")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "ok    stream: 32 tokens",
        "ok    weights",
        "ok    KV cache",
        "ok    compute buffer",
        "ok    swap: pool first unloaded for second (1 swaps); whole answers: 1",
        "gpu-smoke: passed",
    ] {
        assert!(said.contains(line), "{line:?} not in:\n{said}");
    }
    // A wrong architecture list is refused before anything is downloaded or built.
    let out = std::process::Command::new("bash")
        .arg(llorch_tests::repo_root().join("scripts/build-cuda.sh"))
        .env("LLORCH_CUDA_ARCHS", "sm_90")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("LLORCH_CUDA_ARCHS='sm_90' is not a list of CUDA architectures"));
}
