//! End-to-end tests of the home stack: the real `orchestratord`, `pool-managerd`,
//! `engine-provisioner` and `llorch-engine` binaries on the real default model, driven over HTTP
//! as clients would (OpenAI-style and native), with real process crashes and restarts.
//!
//! Each test holds `serial()` for its whole run, across awaits: the guard serializes whole tests
//! (each with its own runtime), so no task of one runtime ever waits on it.
#![allow(clippy::await_holding_lock)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::header::{HeaderName, HeaderValue};
use hyper::StatusCode;
use llorch_client::{ClientError, EventStream, HttpClient};
use llorch_tests::stack::{
    alive, cpu_ticks, signal, Stack, StackOptions, MODEL_ID, NODE_TOKEN, TEST_KEY,
};
use llorch_tests::{frames, post, serial, wait_for, wait_until};
use llorch_wire::engine::ChatMessage;
use llorch_wire::sse::Frame;
use llorch_wire::task::{PoolsAnswer, Priority, TaskAccepted, TaskEnd, TaskRequest};
use llorch_wire::{ErrorBody, ErrorCode};
use serde_json::{json, Value};

fn user(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::new("user", text)]
}

/// A raw prompt the model continues for hundreds of tokens (it keeps counting).
const COUNTING: &str = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,";

fn long_task(max_tokens: u32) -> TaskRequest {
    TaskRequest {
        model_ref: MODEL_ID.into(),
        prompt: Some(COUNTING.into()),
        max_tokens: Some(max_tokens),
        temperature: Some(0.0),
        ..TaskRequest::default()
    }
}

async fn submit(client: &HttpClient, req: &TaskRequest) -> TaskAccepted {
    client
        .post_json("/v2/tasks", req)
        .await
        .expect("task accepted")
}

/// Reads a stream until `n` tokens went by: the task is running mid-answer.
async fn skip_tokens(s: &mut EventStream, n: usize) {
    let mut tokens = 0;
    while tokens < n {
        if s.next_frame().await.unwrap().unwrap().event == "token" {
            tokens += 1;
        }
    }
}

fn event_text(frames: &[Frame]) -> String {
    frames
        .iter()
        .filter(|f| f.event == "token")
        .map(|f| {
            serde_json::from_str::<Value>(&f.data).unwrap()["t"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

fn end_of(frames: &[Frame]) -> TaskEnd {
    let f = frames
        .iter()
        .find(|f| f.event == "end")
        .unwrap_or_else(|| panic!("no end event in {frames:?}"));
    serde_json::from_str(&f.data).unwrap()
}

fn error_of(frames: &[Frame]) -> ErrorBody {
    let f = frames
        .iter()
        .find(|f| f.event == "error")
        .unwrap_or_else(|| panic!("no error event in {frames:?}"));
    serde_json::from_str(&f.data).unwrap()
}

async fn pools(client: &HttpClient) -> PoolsAnswer {
    client.get_json("/v2/pools").await.expect("pools")
}

/// Waits until the pool shows no busy slot and an empty queue.
async fn wait_idle(client: &HttpClient, limit: Duration) -> Duration {
    wait_until("no busy slot and an empty queue", limit, || async move {
        let p = pools(client).await;
        let idle = p.pools.iter().all(|p| p.slots_busy == 0) && p.queue.depth == 0;
        idle.then_some(()).ok_or(format!("{p:?}"))
    })
    .await
}

/// The `data:` payloads of an OpenAI stream.
async fn openai_stream(client: &HttpClient, body: &Value) -> Vec<String> {
    let resp = client
        .post_raw(
            "/v1/chat/completions",
            serde_json::to_vec(body).unwrap(),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let s = EventStream::from_response(resp, std::path::Path::new("orchestratord"))
        .await
        .unwrap();
    frames(s).await.into_iter().map(|f| f.data).collect()
}

#[tokio::test]
async fn openai_chat_streaming_and_not_with_usage_and_models() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let c = stack.client();

    let models: Value = c.get_json("/v1/models").await.unwrap();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL_ID);
    assert_eq!(models["data"][0]["object"], "model");

    let ask = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "What city is the capital of France?"}],
        "max_tokens": 24,
        "temperature": 0,
    });
    let (status, headers, whole) = post(&c, "/v1/chat/completions", &ask).await;
    assert_eq!(status, StatusCode::OK, "{whole}");
    assert!(headers.contains_key("x-correlation-id"));
    assert_eq!(whole["object"], "chat.completion");
    let text = whole["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(whole["choices"][0]["message"]["role"], "assistant");
    let usage = &whole["usage"];
    let (pt, ct) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(pt > 5 && ct > 0 && ct <= 24, "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), pt + ct);

    // The same request streamed: the same text, the same usage, a finish reason, [DONE] last.
    let mut streamed = ask.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let data = openai_stream(&c, &streamed).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed_text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed_text, text);
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish.len(), 1);
    assert_eq!(*finish[0], whole["choices"][0]["finish_reason"]);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"].as_array().unwrap().len(), 0);
    for k in ["prompt_tokens", "completion_tokens", "total_tokens"] {
        assert_eq!(last["usage"][k], usage[k], "{k}");
    }
    // The same prompt a second time: all of it but its last token came from the prefix cache.
    assert_eq!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"],
        usage["prompt_tokens"].as_u64().unwrap() - 1
    );

    // max_tokens reached: finish_reason "length" and exactly that many completion tokens.
    let short = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
        "max_completion_tokens": 5,
        "temperature": 0,
    });
    let (_, _, whole) = post(&c, "/v1/chat/completions", &short).await;
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 5);

    // Legacy completions.
    let (status, _, comp) = post(
        &c,
        "/v1/completions",
        &json!({"model": MODEL_ID, "prompt": COUNTING, "max_tokens": 6, "temperature": 0}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{comp}");
    assert_eq!(comp["object"], "text_completion");
    assert!(
        comp["choices"][0]["text"].as_str().unwrap().contains("13"),
        "{comp}"
    );
    wait_idle(&c, Duration::from_secs(2)).await;
}

#[tokio::test]
async fn native_flow_late_subscriber_sessions_and_cancel() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let c = stack.client();

    let req = TaskRequest {
        task_id: Some("t-capital".into()),
        session_id: Some("s1".into()),
        model_ref: MODEL_ID.into(),
        messages: Some(user("What city is the capital of France?")),
        max_tokens: Some(24),
        temperature: Some(0.0),
        ..TaskRequest::default()
    };
    let accepted = submit(&c, &req).await;
    assert_eq!(accepted.task_id, "t-capital");
    assert_eq!(accepted.streams.sse, "/v2/tasks/t-capital/events");
    assert_eq!(accepted.queue_position, 0);
    let live = frames(c.events(&accepted.streams.sse).await.unwrap()).await;
    let names: Vec<&str> = live.iter().map(|f| f.event.as_str()).collect();
    assert_eq!(names.first(), Some(&"started"), "{names:?}");
    assert_eq!(
        &names[names.len() - 2..],
        ["metrics", "end"],
        "{live:?}\n{}",
        stack.logs()
    );
    assert!(event_text(&live).contains("Paris"));
    let end = end_of(&live);
    assert_eq!(end.task_id, "t-capital");
    assert!(end.tokens_in > 5 && end.tokens_out > 0);
    assert_eq!(
        end.tokens_out as usize,
        names
            .iter()
            .filter(|n| **n == "token")
            .count()
            .max(end.tokens_out as usize)
    );
    assert!(end.ttft_ms >= end.queue_ms);
    // Token indexes count from 0 without gaps.
    for (n, f) in live.iter().filter(|f| f.event == "token").enumerate() {
        assert_eq!(serde_json::from_str::<Value>(&f.data).unwrap()["i"], n);
    }

    a_late_subscriber_gets_the_same_stream(&c, &accepted.streams.sse, &live).await;
    task_ids_are_per_key(&stack, &c, &req, &accepted.streams.sse, &live).await;
    the_sessions_next_turn_reuses_the_kv_cache(&c, &req, &live, end.tokens_in).await;
    a_cancel_mid_stream_frees_the_slot(&c).await;
    an_idle_stack_spins_no_daemon(&stack).await;
    the_capabilities_name_the_pool(&c).await;
}

async fn a_late_subscriber_gets_the_same_stream(c: &HttpClient, sse: &str, live: &[Frame]) {
    // A subscriber that comes after the end gets the very same stream.
    let late = frames(c.events(sse).await.unwrap()).await;
    assert_eq!(late, live);
}

async fn task_ids_are_per_key(
    stack: &Stack,
    c: &HttpClient,
    req: &TaskRequest,
    sse: &str,
    live: &[Frame],
) {
    // A duplicate task id of the same key is refused.
    let dup = c
        .post_json::<_, TaskAccepted>("/v2/tasks", req)
        .await
        .unwrap_err();
    assert!(
        matches!(
            dup,
            ClientError::Status {
                status: StatusCode::CONFLICT,
                ..
            }
        ),
        "{dup}"
    );
    // Ids are per key: another key may use the same id, gets a task of its own, and learns
    // nothing of the first (a 409 would tell it the id exists).
    let other = HttpClient::new(&stack.url())
        .unwrap()
        .with_token(Some("other-key-0123456789abcdef".into()));
    let mut theirs = req.clone();
    theirs.session_id = None;
    theirs.max_tokens = Some(4);
    let accepted_other = submit(&other, &theirs).await;
    assert_eq!(accepted_other.task_id, "t-capital");
    let other_frames = frames(other.events(&accepted_other.streams.sse).await.unwrap()).await;
    assert!(end_of(&other_frames).tokens_out <= 4);
    // The first key still reads its own task, unchanged.
    let again = frames(c.events(sse).await.unwrap()).await;
    assert_eq!(again, live);
}

async fn the_sessions_next_turn_reuses_the_kv_cache(
    c: &HttpClient,
    req: &TaskRequest,
    live: &[Frame],
    tokens_in: u32,
) {
    // The session remembers the pool and slot; the next turn reuses the KV cache.
    let s: Value = c.get_json("/v2/sessions/s1").await.unwrap();
    assert_eq!(s["pool_id"], "default");
    assert_eq!(s["turns"], 1);
    let mut follow = req.clone();
    follow.task_id = None;
    let mut msgs = user("What city is the capital of France?");
    msgs.push(ChatMessage::new("assistant", event_text(live)));
    msgs.push(ChatMessage::new("user", "And of Italy?"));
    follow.messages = Some(msgs);
    let a2 = submit(c, &follow).await;
    let second = frames(c.events(&a2.streams.sse).await.unwrap()).await;
    let metrics: Value =
        serde_json::from_str(&second.iter().find(|f| f.event == "metrics").unwrap().data).unwrap();
    assert!(
        metrics["cached_tokens"].as_u64().unwrap() >= tokens_in as u64,
        "{metrics}"
    );
    let resp = c
        .send(
            c.request(hyper::Method::DELETE, "/v2/sessions/s1")
                .body(http_body_util::Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
}

async fn a_cancel_mid_stream_frees_the_slot(c: &HttpClient) {
    // Cancel mid-stream: tokens stop, the stream ends with CANCELED, the slot is free.
    let accepted = submit(c, &long_task(600)).await;
    let mut stream = c.events(&accepted.streams.sse).await.unwrap();
    skip_tokens(&mut stream, 5).await;
    let canceled: Value = c
        .post_json(
            &format!("/v2/tasks/{}/cancel", accepted.task_id),
            &json!({}),
        )
        .await
        .unwrap();
    assert_eq!(canceled["canceled"], true);
    let rest = frames(stream).await;
    let err = error_of(&rest);
    assert_eq!(err.code, ErrorCode::Canceled);
    assert!(
        rest.len() < 100,
        "tokens kept coming after cancel: {}",
        rest.len()
    );
    let freed = wait_idle(c, Duration::from_secs(1)).await;
    eprintln!("slot free {freed:?} after cancel");
    let info: Value = c
        .get_json(&format!("/v2/tasks/{}", accepted.task_id))
        .await
        .unwrap();
    assert_eq!(info["state"], "canceled");
}

async fn an_idle_stack_spins_no_daemon(stack: &Stack) {
    // An idle stack is idle: no daemon spins (a handoff watcher that reacted to its own reads
    // once kept pool-managerd at a full core).
    let pids = [
        stack.node.as_ref().unwrap().pid(),
        stack.orch.as_ref().unwrap().pid(),
    ];
    let before: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (pid, b) in pids.iter().zip(before) {
        let used = cpu_ticks(*pid) - b;
        assert!(used < 10, "pid {pid} used {used} of 100 ticks while idle");
    }
}

async fn the_capabilities_name_the_pool(c: &HttpClient) {
    let caps: Value = c.get_json("/v2/meta/capabilities").await.unwrap();
    assert_eq!(caps["pools"][0]["model_id"], MODEL_ID);
    assert_eq!(caps["pools"][0]["slots"], 4);
    assert_eq!(caps["pools"][0]["ctx_per_slot"], 1024);
    assert!(caps["pools"][0]["engine_version"].is_string(), "{caps}");
}

#[tokio::test]
async fn twelve_clients_on_four_slots_all_finish_without_leaking_leases() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let c = stack.client();
    let request = |i: usize| TaskRequest {
        model_ref: MODEL_ID.into(),
        messages: Some(user(&format!("Write one sentence about the number {i}."))),
        max_tokens: Some(48),
        temperature: Some(0.0),
        ..TaskRequest::default()
    };
    // Each prompt's greedy answer alone, one at a time: what its stream must carry later.
    let mut solo = Vec::new();
    for i in 0..12 {
        let a = submit(&c, &request(i)).await;
        solo.push(event_text(
            &frames(c.events(&a.streams.sse).await.unwrap()).await,
        ));
    }
    let mut handles = Vec::new();
    for i in 0..12 {
        let c = c.clone();
        let req = request(i);
        handles.push(tokio::spawn(async move {
            let a = submit(&c, &req).await;
            let f = frames(c.events(&a.streams.sse).await.unwrap()).await;
            (a, end_of(&f), event_text(&f))
        }));
    }
    let mut queued = 0;
    let mut max_queue_ms = 0;
    let common = |a: &str, b: &str| a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    for (i, h) in handles.into_iter().enumerate() {
        let (a, end, text) = h.await.unwrap();
        assert!(!text.trim().is_empty());
        // Each stream carries its own request's answer: it agrees with its own solo answer at
        // least as far as with any other request's (batching may change a late token, a
        // swapped or mixed stream would follow another answer).
        let own = common(&text, &solo[i]);
        assert!(own > 0, "answer {i} {text:?} vs its solo {:?}", solo[i]);
        for (j, other) in solo.iter().enumerate().filter(|(j, _)| *j != i) {
            assert!(
                own >= common(&text, other),
                "answer {i} {text:?} follows request {j}'s {other:?} more than its own {:?}",
                solo[i]
            );
        }
        assert!(end.tokens_out > 0);
        if a.queue_position > 0 {
            queued += 1;
        }
        // With more tasks ahead than slots, the start cannot be immediate.
        if a.queue_position >= 4 {
            assert!(a.predicted_start_ms > 0, "{a:?}");
        }
        max_queue_ms = max_queue_ms.max(end.queue_ms);
    }
    assert!(
        queued >= 1 && max_queue_ms > 0,
        "the queue was not used: {queued} queued, {max_queue_ms} ms"
    );
    let p = pools(&c).await;
    assert_eq!(p.pools[0].slots_busy, 0, "{p:?}");
    assert_eq!(p.queue.depth, 0);
    assert_eq!(p.queue.running, 0);
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_slot_within_a_second() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        ..StackOptions::default()
    });
    let c = stack.client();
    let body = json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse keeper."}],
        "max_tokens": 800,
        "stream": true,
    });
    let resp = c
        .post_raw(
            "/v1/chat/completions",
            serde_json::to_vec(&body).unwrap(),
            &[],
        )
        .await
        .unwrap();
    let mut s = EventStream::from_response(resp, std::path::Path::new("o"))
        .await
        .unwrap();
    for _ in 0..5 {
        s.next_frame().await.unwrap().unwrap();
    }
    assert_eq!(pools(&c).await.pools[0].slots_busy, 1);
    let engine = llorch_client::UnixClient::new(stack.handoff().expect("handoff").socket);
    assert_eq!(
        engine.slots().await.unwrap().busy,
        1,
        "the engine generates"
    );
    drop(s);
    let freed = wait_idle(&c, Duration::from_secs(1)).await;
    eprintln!("slot free {freed:?} after the client went away");
    // Not only orchestratord's lease: the engine itself stops generating and frees its slot
    // (within a decode step; a second is the bound, not a measurement).
    let e = &engine;
    wait_until(
        "the engine to stop generating for a client that went away",
        Duration::from_secs(1),
        || async move {
            let status = e.slots().await.unwrap();
            (status.busy == 0)
                .then_some(())
                .ok_or(format!("{status:?}"))
        },
    )
    .await;
    // The one slot serves the next client at once.
    let (status, _, v) = post(
        &c,
        "/v1/chat/completions",
        &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

#[tokio::test]
async fn an_openai_stream_that_waits_commits_and_gets_keep_alive_comments() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        orch_args: vec!["--sse-keepalive-secs".into(), "1".into()],
        ..StackOptions::default()
    });
    let c = stack.client();
    let running = submit(&c, &long_task(800)).await;
    let mut s = c.events(&running.streams.sse).await.unwrap();
    assert_eq!(s.next_frame().await.unwrap().unwrap().event, "started");
    // A streaming chat completion queued behind it: after one keep-alive interval without a
    // start it gets its 200 head anyway, then comment lines, no text.
    let body = json!({
        "model": MODEL_ID, "stream": true, "max_tokens": 16, "temperature": 0,
        "messages": [{"role": "user", "content": "What city is the capital of France?"}]
    });
    let sent = Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        c.post_raw(
            "/v1/chat/completions",
            serde_json::to_vec(&body).unwrap(),
            &[],
        ),
    )
    .await
    .expect("no head while the task waits")
    .unwrap();
    let waited = sent.elapsed();
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(
        waited >= Duration::from_millis(900),
        "the head came before the keep-alive interval: {waited:?}"
    );
    let mut body = resp.into_body();
    let mut seen = String::new();
    let mut read = async |seen: &mut String, until: &str| {
        while !seen.contains(until) {
            let frame = body.frame().await.expect("the stream goes on").unwrap();
            if let Ok(d) = frame.into_data() {
                seen.push_str(std::str::from_utf8(&d).unwrap());
            }
        }
    };
    read(&mut seen, ": keep-alive").await;
    read(&mut seen, ": keep-alive\n\n: keep-alive").await;
    assert!(
        !seen.contains("data:"),
        "text before the task started: {seen}"
    );
    // The running task is cancelled: the waiting one starts and answers in the same stream.
    c.post_json::<_, Value>(&format!("/v2/tasks/{}/cancel", running.task_id), &json!({}))
        .await
        .unwrap();
    read(&mut seen, "data: [DONE]").await;
    let text: String = seen
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert!(text.contains("Paris"), "{seen}");
    assert!(!seen.contains("\"error\""), "{seen}");
    drop(s);
}

#[tokio::test]
async fn full_queue_rejects_or_drops_lru_and_deadlines_are_enforced() {
    let _g = serial();
    // reject: one slot, two places in the queue.
    let stack = Stack::start(StackOptions {
        slots: 1,
        queue_capacity: 2,
        ..StackOptions::default()
    });
    let c = stack.client();
    let running = submit(&c, &long_task(800)).await;
    // Wait until it runs, so the queue holds exactly what follows.
    let mut s = c.events(&running.streams.sse).await.unwrap();
    assert_eq!(s.next_frame().await.unwrap().unwrap().event, "started");
    // Deadline already unmeetable at admission: no slot frees within 1 ms.
    let mut hurried = long_task(4);
    hurried.deadline_ms = Some(1);
    let err = c
        .post_json::<_, TaskAccepted>("/v2/tasks", &hurried)
        .await
        .unwrap_err();
    match err {
        ClientError::Status {
            status,
            body: Some(b),
            retry_after,
            ..
        } => {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(b.code, ErrorCode::DeadlineUnmet);
            assert!(retry_after.is_some());
        }
        other => panic!("{other}"),
    }
    // A deadline that passes admission (no service time measured yet: the prior is 1 s) but
    // expires in the queue behind the long task.
    let mut patient = long_task(4);
    patient.deadline_ms = Some(1500);
    let expiring = submit(&c, &patient).await;
    let q2 = submit(&c, &long_task(4)).await;
    assert_eq!(q2.queue_position, 1);
    let (status, headers, body) = post(
        &c,
        "/v2/tasks",
        &serde_json::to_value(long_task(4)).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(body["code"], "ADMISSION_REJECT");
    assert_eq!(body["policy_label"], "reject");
    assert_eq!(body["retriable"], true);
    assert!(body["retry_after_ms"].as_u64().unwrap() > 0);
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    let expired = frames(c.events(&expiring.streams.sse).await.unwrap()).await;
    assert_eq!(error_of(&expired).code, ErrorCode::DeadlineUnmet);
    c.post_json::<_, Value>(&format!("/v2/tasks/{}/cancel", running.task_id), &json!({}))
        .await
        .unwrap();
    // The task queued behind it now runs.
    assert!(end_of(&frames(c.events(&q2.streams.sse).await.unwrap()).await).tokens_out > 0);
    drop(s);
    drop(stack);

    // drop-lru: the oldest batch task is evicted and told so.
    let stack = Stack::start(StackOptions {
        slots: 1,
        queue_capacity: 2,
        policy: "drop-lru",
        ..StackOptions::default()
    });
    let c = stack.client();
    let running = submit(&c, &long_task(800)).await;
    let mut s = c.events(&running.streams.sse).await.unwrap();
    assert_eq!(s.next_frame().await.unwrap().unwrap().event, "started");
    let batch = |n| TaskRequest {
        priority: Priority::Batch,
        ..long_task(n)
    };
    let oldest = submit(&c, &batch(4)).await;
    let second = submit(&c, &batch(4)).await;
    let newcomer = submit(&c, &long_task(4)).await;
    let evicted = frames(c.events(&oldest.streams.sse).await.unwrap()).await;
    let err = error_of(&evicted);
    assert_eq!(err.code, ErrorCode::QueueFullDropLru);
    assert_eq!(err.policy_label.as_deref(), Some("drop-lru"));
    let p = pools(&c).await;
    assert_eq!(p.queue.depth, 2);
    assert_eq!(p.queue.policy, "drop-lru");
    c.post_json::<_, Value>(&format!("/v2/tasks/{}/cancel", running.task_id), &json!({}))
        .await
        .unwrap();
    // The interactive newcomer runs before the older batch task.
    let n = end_of(&frames(c.events(&newcomer.streams.sse).await.unwrap()).await);
    let b = end_of(&frames(c.events(&second.streams.sse).await.unwrap()).await);
    assert!(n.queue_ms <= b.queue_ms + 5000);
    drop(s);
}

#[tokio::test]
async fn killing_the_engine_fails_the_stream_and_the_pool_recovers_for_queued_tasks() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        ..StackOptions::default()
    });
    let c = stack.client();
    let first_pid = stack.handoff().expect("handoff").pid;
    let running = submit(&c, &long_task(800)).await;
    let mut s = c.events(&running.streams.sse).await.unwrap();
    skip_tokens(&mut s, 3).await;
    // Two tasks wait behind it.
    let waiting: Vec<TaskAccepted> = vec![
        submit(
            &c,
            &TaskRequest {
                messages: Some(user("Say hello.")),
                prompt: None,
                ..long_task(8)
            },
        )
        .await,
        submit(
            &c,
            &TaskRequest {
                messages: Some(user("Say goodbye.")),
                prompt: None,
                ..long_task(8)
            },
        )
        .await,
    ];
    signal(first_pid, libc::SIGKILL);
    let rest = frames(s).await;
    let err = error_of(&rest);
    assert_eq!(err.code, ErrorCode::EngineFailed, "{err:?}");
    assert!(err.retriable);
    // The node restarts the engine by itself and the queued tasks are served.
    for w in waiting {
        let f = frames(c.events(&w.streams.sse).await.unwrap()).await;
        assert!(end_of(&f).tokens_out > 0, "{f:?}\n{}", stack.logs());
    }
    let p = pools(&c).await;
    assert_eq!(p.pools[0].restarts, 1, "{p:?}");
    assert!(p.pools[0].last_error.is_some());
    assert_eq!(p.pools[0].slots_busy, 0);
    let second_pid = stack.handoff().expect("handoff").pid;
    assert_ne!(first_pid, second_pid);
    assert!(!alive(first_pid));
}

/// Connections waiting in the accept queue of the listening Unix socket at `path` (`ss -xl`:
/// the listening socket's receive queue).
fn unix_backlog(path: &str) -> u64 {
    let out = std::process::Command::new("ss")
        .args(["-xlnH"])
        .output()
        .expect("run ss (iproute2)");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.split_whitespace().any(|f| f == path))
        .and_then(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let at = f.iter().position(|x| *x == "LISTEN")?;
            f.get(at + 1)?.parse().ok()
        })
        .unwrap_or(0)
}

/// An engine that dies while taking a task (the task may be what kills it: a hostile grammar
/// or prompt) must not be handed the same task again after its restart, nor another pool:
/// the task ends with a final, non-retriable ENGINE_FAILED, and the pool recovers for others.
#[tokio::test]
async fn a_task_an_engine_died_on_is_not_sent_again() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        ..StackOptions::default()
    });
    let c = stack.client();
    let handoff = stack.handoff().expect("handoff");
    // Stopped, the engine leaves the forwarded request in its socket's accept queue; killed
    // there, it dies holding the request, as a crash on the request would.
    signal(handoff.pid, libc::SIGSTOP);
    let doomed = submit(&c, &long_task(8)).await;
    wait_for(
        "the request in the engine's accept queue",
        Duration::from_secs(30),
        || unix_backlog(&handoff.socket) >= 1,
    );
    signal(handoff.pid, libc::SIGKILL);
    let f = frames(c.events(&doomed.streams.sse).await.unwrap()).await;
    let err = error_of(&f);
    assert_eq!(err.code, ErrorCode::EngineFailed, "{err:?}");
    assert!(!err.retriable, "{err:?}");
    assert!(err.message.contains("not retried"), "{err:?}");
    // The node restarted the engine once; the next task is served.
    let next = submit(&c, &long_task(4)).await;
    let f = frames(c.events(&next.streams.sse).await.unwrap()).await;
    assert!(end_of(&f).tokens_out > 0, "{f:?}\n{}", stack.logs());
    assert_eq!(pools(&c).await.pools[0].restarts, 1);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// An engine (which parses untrusted model files) owns its handoff directory. A FIFO or a link
/// to `/dev/zero` planted under its handoff file's name must neither block pool-managerd nor
/// fill its memory; the pool serves again once a real file is back.
#[tokio::test]
async fn a_hostile_handoff_file_neither_blocks_nor_bloats_the_node() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        ..StackOptions::default()
    });
    let c = stack.client();
    let node = HttpClient::new(&format!("unix:{}", stack.node_socket().display())).unwrap();
    let node_pid = stack.node.as_ref().unwrap().pid();
    let file = stack.runtime().join("handoff/default/default.json");
    let original = std::fs::read(&file).unwrap();
    let before = rss_kib(node_pid);
    let warnings = || {
        stack
            .node
            .as_ref()
            .unwrap()
            .log_text()
            .matches("Cannot read a handoff file.")
            .count()
    };
    for (i, plant) in ["fifo", "/dev/zero"].into_iter().enumerate() {
        std::fs::remove_file(&file).unwrap();
        if plant == "fifo" {
            let made = std::process::Command::new("mkfifo")
                .arg(&file)
                .status()
                .unwrap();
            assert!(made.success());
        } else {
            std::os::unix::fs::symlink(plant, &file).unwrap();
        }
        wait_for(
            "pool-managerd to refuse the planted file",
            Duration::from_secs(10),
            || warnings() > i,
        );
        let asked = Instant::now();
        let answer =
            tokio::time::timeout(Duration::from_secs(1), node.get_json::<Value>("/v2/pools")).await;
        assert!(
            matches!(answer, Ok(Ok(_))),
            "{plant}: {answer:?} after {:?}",
            asked.elapsed()
        );
    }
    let grown = rss_kib(node_pid).saturating_sub(before);
    assert!(grown < 32 * 1024, "pool-managerd grew by {grown} KiB");
    // The engine writes its file back as it does, atomically: the pool serves again.
    std::fs::remove_file(&file).unwrap();
    let tmp = file.with_file_name(".default.json.tmp");
    std::fs::write(&tmp, &original).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let next = submit(&c, &long_task(4)).await;
    let f = frames(c.events(&next.streams.sse).await.unwrap()).await;
    assert!(end_of(&f).tokens_out > 0, "{f:?}\n{}", stack.logs());
}

#[tokio::test]
async fn bad_requests_get_typed_errors_and_do_not_disturb_others() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let c = stack.client();
    // A stream in flight while the bad requests arrive.
    let bystander = submit(&c, &long_task(120)).await;
    let watcher = {
        let c = c.clone();
        let sse = bystander.streams.sse.clone();
        tokio::spawn(async move { frames(c.events(&sse).await.unwrap()).await })
    };

    each_bad_parameter_is_named(&c).await;
    malformed_and_oversized_bodies_are_refused(&c).await;
    missing_and_wrong_keys_are_refused(&stack).await;
    the_correlation_id_reaches_every_hop(&stack, &c).await;
    another_key_cannot_see_or_cancel_the_task(&stack, &bystander.task_id).await;
    // The bystander's stream was not disturbed.
    let f = watcher.await.unwrap();
    assert_eq!(end_of(&f).tokens_out, 120);
    let _ = TEST_KEY;
}

/// A chat request to the default model with `extra`'s fields set.
fn chat_with(extra: Value) -> Value {
    let mut b = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    for (k, v) in extra.as_object().unwrap() {
        b[k] = v.clone();
    }
    b
}

/// Every bad parameter of `/v1` and `/v2` is refused with its status and named.
async fn each_bad_parameter_is_named(c: &HttpClient) {
    // (path, body, status, param or field)
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            chat_with(json!({"model": "gpt-9"})),
            404,
            "model",
        ),
        (
            "/v1/chat/completions",
            chat_with(json!({"temperature": "hot"})),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            chat_with(json!({"temperature": 5.0})),
            400,
            "temperature",
        ),
        (
            "/v1/chat/completions",
            chat_with(json!({"max_tokens": -3})),
            400,
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            chat_with(json!({"n": 17})),
            400,
            "n",
        ),
        (
            "/v1/chat/completions",
            chat_with(json!({"tools": [{"type": "function"}]})),
            400,
            "tools[0]",
        ),
        (
            "/v1/chat/completions",
            chat_with(json!({"top_logprobs": 2})),
            400,
            "logprobs",
        ),
        (
            "/v1/chat/completions",
            chat_with(json!({"frobnicate": 1})),
            400,
            "frobnicate",
        ),
        (
            "/v1/chat/completions",
            chat_with(json!({"messages": [{"role": "wizard", "content": "x"}]})),
            400,
            "messages[0].role",
        ),
        (
            "/v2/tasks",
            json!({"model_ref": "gpt-9", "prompt": "x"}),
            404,
            "model",
        ),
        (
            "/v2/tasks",
            json!({"model_ref": MODEL_ID, "prompt": "x", "top_p": 7}),
            400,
            "top_p",
        ),
        (
            "/v2/tasks",
            json!({"model_ref": MODEL_ID, "prompt": "x", "priority": "urgent"}),
            400,
            "priority",
        ),
        (
            "/v2/tasks",
            json!({"model_ref": MODEL_ID, "prompt": "x", "placement": {"pin_pool_id": "nope"}}),
            400,
            "placement",
        ),
        (
            "/v2/tasks",
            json!({"model_ref": MODEL_ID, "prompt": "x", "ctx": 100000}),
            400,
            "ctx",
        ),
        ("/v2/tasks", json!({"model_ref": MODEL_ID}), 400, "prompt"),
    ];
    for (path, body, status, field) in cases {
        let (got, headers, v) = post(c, path, &body).await;
        assert_eq!(got.as_u16(), status, "{path} {body}: {v}");
        assert!(headers.contains_key("x-correlation-id"));
        if path.starts_with("/v1") {
            assert_eq!(v["error"]["param"], field, "{body}: {v}");
            assert!(v["error"]["message"].as_str().unwrap().len() > 10);
            assert!(v["error"]["type"].is_string());
        } else {
            assert_eq!(v["field"], field, "{body}: {v}");
            assert!(v["code"].is_string());
        }
    }
}

async fn malformed_and_oversized_bodies_are_refused(c: &HttpClient) {
    // Malformed JSON and an oversized body.
    let resp = c
        .post_raw("/v1/chat/completions", "{\"model\": ", &[])
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let v: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["error"]["param"], "body");
    // Just over the 1 MiB limit (see the engine test for why not far over).
    let huge = format!(
        "{{\"model_ref\":\"{MODEL_ID}\",\"prompt\":\"{}\"}}",
        "a".repeat((1 << 20) + 1024)
    );
    let resp = c.post_raw("/v2/tasks", huge, &[]).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

async fn missing_and_wrong_keys_are_refused(stack: &Stack) {
    // Missing and wrong API keys.
    let anon = HttpClient::new(&stack.url()).unwrap();
    let (status, _, v) = post(&anon, "/v1/chat/completions", &chat_with(json!({}))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    let wrong = HttpClient::new(&stack.url())
        .unwrap()
        .with_token(Some("wrong-key-0123456789abcdef".into()));
    let (status, _, v) = post(
        &wrong,
        "/v2/tasks",
        &json!({"model_ref": MODEL_ID, "prompt": "x"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(v["code"], "UNAUTHORIZED");
    let log = stack.orch.as_ref().unwrap().log_text();
    assert!(
        !log.contains("wrong-key-0123456789abcdef"),
        "a key reached the log"
    );
}

async fn the_correlation_id_reaches_every_hop(stack: &Stack, c: &HttpClient) {
    // The correlation id is echoed.
    let cid = (
        HeaderName::from_static("x-correlation-id"),
        HeaderValue::from_static("corr-123"),
    );
    let resp = c
        .post_raw(
            "/v1/chat/completions",
            serde_json::to_vec(&chat_with(json!({}))).unwrap(),
            &[cid],
        )
        .await
        .unwrap();
    assert_eq!(resp.headers()["x-correlation-id"], "corr-123");
    let _ = resp.into_body().collect().await;
    // It reached every hop's log.
    let engine_log =
        std::fs::read_to_string(stack.runtime().join("logs/default.engine.log")).unwrap();
    assert!(engine_log.contains("corr-123"), "{engine_log}");
    assert!(stack.node.as_ref().unwrap().log_text().contains("corr-123"));
    assert!(stack.orch.as_ref().unwrap().log_text().contains("corr-123"));
}

async fn another_key_cannot_see_or_cancel_the_task(stack: &Stack, task_id: &str) {
    // Another client's key does not see, stream or cancel this client's task.
    let other = HttpClient::new(&stack.url())
        .unwrap()
        .with_token(Some("other-key-0123456789abcdef".into()));
    let err = other
        .get_json::<Value>(&format!("/v2/tasks/{}", task_id))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Status {
                status: StatusCode::NOT_FOUND,
                ..
            }
        ),
        "{err}"
    );
    let (status, _, _) = post(&other, &format!("/v2/tasks/{}/cancel", task_id), &json!({})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

/// Connections waiting in `port`'s accept queue (the listening socket's receive queue in
/// /proc/net/tcp): 0 once the server has accepted every connection made to it.
fn accept_backlog(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        // State 0A is LISTEN; tx_queue:rx_queue, the second the backlog.
        (local_port == port && f.get(3) == Some(&"0A"))
            .then(|| u64::from_str_radix(f.get(4)?.split(':').nth(1)?, 16).ok())
            .flatten()
    })
}

#[tokio::test]
async fn a_request_on_a_connection_accepted_before_sigterm_is_answered() {
    // The race of a restart under load: a client's connection was accepted just before the
    // stop, its request (behind a TLS handshake, say) arrives just after. The task must be
    // placed and answered, not queued with nobody dispatching until the process exits.
    let _g = serial();
    let mut stack = Stack::start(StackOptions::default());
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", stack.port))
        .await
        .unwrap();
    let body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "What city is the capital of France?"}], "max_tokens": 8, "temperature": 0}).to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {TEST_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let (head, rest) = request.split_at(20);
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(head.as_bytes()).await.unwrap();
    llorch_tests::wait_for(
        "orchestratord to accept the connection",
        Duration::from_secs(10),
        || accept_backlog(stack.port) == Some(0),
    );
    let orch = stack.orch.as_mut().unwrap();
    signal(orch.pid(), libc::SIGTERM);
    llorch_tests::wait_for(
        "orchestratord to stop accepting",
        Duration::from_secs(10),
        || orch.log_text().contains("Stopping: no new connections"),
    );
    conn.write_all(rest.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), conn.read_to_end(&mut answer))
        .await
        .expect("the answer within 30 s")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("Paris"), "{answer}");
    let status = orch.child.wait().unwrap();
    assert!(status.success(), "{status}");
    stack.orch = None;
}

#[tokio::test]
async fn a_restarted_control_plane_gets_the_node_back_by_itself() {
    let _g = serial();
    let mut stack = Stack::start(StackOptions::default());
    let node_pid = stack.node.as_ref().unwrap().pid();
    let status = stack.orch.as_mut().unwrap().stop();
    assert!(status.success(), "{status}");
    stack.orch = None;
    stack.start_orchestratord();
    // Asked at once, before the node noticed the restart: the requests wait in the queue for
    // the node to register again (its heartbeat is answered 404, or refused) and are answered;
    // none is refused. A model nobody registers is refused once the node's heartbeat interval
    // (1 s here) has passed, not after the whole 15 s grace.
    let c = stack.client();
    let ask = |model: &'static str| {
        let c = c.clone();
        tokio::spawn(async move {
            let start = Instant::now();
            let (status, _, v) = post(
                &c,
                "/v1/chat/completions",
                &json!({"model": model, "messages": [{"role": "user", "content": "What city is the capital of France?"}], "max_tokens": 16, "temperature": 0}),
            )
            .await;
            (status, v, start.elapsed())
        })
    };
    let (answers, typo) = (ask(MODEL_ID), ask("no-such-model"));
    let (status, v, _) = answers.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{v}");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("Paris"));
    let (status, v, waited) = typo.await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "{v}");
    assert_eq!(v["error"]["code"], "model_not_found", "{v}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(stack.node.as_ref().unwrap().pid(), node_pid);
    assert!(alive(node_pid));
    let nodes: Value = c.get_json("/v2/nodes").await.unwrap();
    assert_eq!(nodes[0]["node_id"], "node-a");
    assert_eq!(nodes[0]["online"], true);
}

#[tokio::test]
async fn node_tokens_guard_registration_and_the_node_api() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        node_token: true,
        ..StackOptions::default()
    });
    let c = stack.client();
    // The node registered with its token, and orchestratord calls it with that token.
    let (status, _, v) = post(
        &c,
        "/v1/chat/completions",
        &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
    a_token_registers_only_its_own_node(&stack, &c).await;
    a_tokens_line_bounds_its_models_and_slots(&stack).await;
    operator_endpoints_need_an_admin_key(&c, &stack.url()).await;
    the_node_api_needs_the_node_token(&stack).await;
}

async fn a_token_registers_only_its_own_node(stack: &Stack, c: &HttpClient) {
    // Registration without the token is refused...
    let reg = json!({"node_id": "intruder", "address": "http://127.0.0.1:1", "version": "0",
                     "heartbeat_secs": 5, "pools": []});
    let anon = HttpClient::new(&stack.url()).unwrap();
    let (status, _, v) = post(&anon, "/v2/nodes/register", &reg).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    // ...and node-a's own token is bound to node-a: it may neither register another node id
    // nor heartbeat for one, nor take over an unregistered id.
    let holder = HttpClient::new(&stack.url())
        .unwrap()
        .with_token(Some(NODE_TOKEN.into()));
    let (status, _, v) = post(&holder, "/v2/nodes/register", &reg).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    assert_eq!(v["code"], "FORBIDDEN", "{v}");
    assert!(v["message"].as_str().unwrap().contains("\"node-a\""), "{v}");
    let (status, _, v) = post(
        &holder,
        "/v2/nodes/node-b/heartbeat",
        &json!({"pools": [], "staged_models": []}),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{v}");
    let nodes: Value = c.get_json("/v2/nodes").await.unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    assert_eq!(nodes[0]["node_id"], "node-a");
    assert!(stack
        .orch
        .as_ref()
        .unwrap()
        .log_text()
        .contains("Refused a node token used for another node id."));
}

async fn a_tokens_line_bounds_its_models_and_slots(stack: &Stack) {
    // A token's line may name the models and the slots its node may register: rewritten and
    // reloaded, node-a's token may still report its own pool, but not claim another model's
    // traffic nor more slots than its line allows (403 naming the field).
    let holder = HttpClient::new(&stack.url())
        .unwrap()
        .with_token(Some(NODE_TOKEN.into()));
    let tokens = stack.dir.path().join("node-tokens");
    llorch_tests::write_secret(
        &tokens,
        &format!("node-a {NODE_TOKEN} models={MODEL_ID} slots=4\n"),
    );
    signal(stack.orch.as_ref().unwrap().pid(), libc::SIGHUP);
    let claim = |model: &str, slots: u32| {
        json!({"pools": [{"pool_id": "default", "model_id": model, "state": "ready",
                          "slots_total": slots, "slots_busy": 0, "ctx_per_slot": 1024,
                          "device": "cpu"}], "staged_models": []})
    };
    wait_for("the reload", Duration::from_secs(10), || {
        stack.logs().contains("Reloaded the key files.")
    });
    let (status, _, v) = post(
        &holder,
        "/v2/nodes/node-a/heartbeat",
        &claim("llama-70b", 4),
    )
    .await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::FORBIDDEN, Some("pools[0].model_id")),
        "{v}"
    );
    let (status, _, v) = post(&holder, "/v2/nodes/node-a/heartbeat", &claim(MODEL_ID, 256)).await;
    assert_eq!(
        (status, v["field"].as_str()),
        (StatusCode::FORBIDDEN, Some("pools")),
        "{v}"
    );
    assert!(v["message"].as_str().unwrap().contains("slots"), "{v}");
}

async fn operator_endpoints_need_an_admin_key(c: &HttpClient, url: &str) {
    // The node list and pool drains are for admin keys: a client key without the mark is
    // refused (403), and nothing is drained.
    let other = HttpClient::new(url)
        .unwrap()
        .with_token(Some("other-key-0123456789abcdef".into()));
    for path in ["/v2/pools/default/drain", "/v2/pools/default/resume"] {
        let (status, _, v) = post(&other, path, &json!({})).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}: {v}");
        assert!(v["message"].as_str().unwrap().contains("admin"), "{v}");
    }
    let err = other.get_json::<Value>("/v2/nodes").await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Status {
                status: StatusCode::FORBIDDEN,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        pools(c).await.pools[0].state,
        llorch_wire::node::PoolState::Ready
    );
    // The same key still generates: the mark scopes operator endpoints only.
    let (status, _, v) = post(
        &other,
        "/v1/chat/completions",
        &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{v}");
}

async fn the_node_api_needs_the_node_token(stack: &Stack) {
    // The node API refuses a caller without the node token.
    let node_api = HttpClient::new(&format!(
        "unix:{}",
        stack.runtime().join("pool-managerd.sock").display()
    ))
    .unwrap();
    let err = node_api.get_json::<Value>("/v2/pools").await.unwrap_err();
    assert!(
        matches!(
            err,
            ClientError::Status {
                status: StatusCode::UNAUTHORIZED,
                ..
            }
        ),
        "{err}"
    );
    // So do the operator's model actions, which could otherwise unload or pin any pool.
    for action in ["load", "unload", "pin", "unpin", "drain"] {
        let err = node_api
            .post_json::<_, Value>(&format!("/v2/pools/default/{action}"), &json!({}))
            .await
            .unwrap_err();
        let status = llorch_client::status_of(&err);
        assert_eq!(status, Some(StatusCode::UNAUTHORIZED), "{action}: {err}");
    }
    let with = node_api.with_token(Some(NODE_TOKEN.into()));
    let pools: Value = with.get_json("/v2/pools").await.unwrap();
    assert_eq!(pools[0]["pool_id"], "default");
}

#[tokio::test]
async fn a_wedged_engine_ends_the_stream_and_frees_the_slot() {
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        orch_args: vec!["--stream-idle-secs".into(), "2".into()],
        ..StackOptions::default()
    });
    let c = stack.client();
    let engine = stack.handoff().expect("handoff").pid;
    let running = submit(&c, &long_task(800)).await;
    let mut s = c.events(&running.streams.sse).await.unwrap();
    skip_tokens(&mut s, 3).await;
    // Stopped, not dead: the socket stays, the process holds its slot, nothing comes.
    signal(engine, libc::SIGSTOP);
    let stopped_at = Instant::now();
    let rest = frames(s).await;
    let waited = stopped_at.elapsed();
    signal(engine, libc::SIGCONT);
    let err = error_of(&rest);
    assert_eq!(err.code, ErrorCode::EngineFailed, "{err:?}");
    assert!(err.message.contains("sent nothing for 2 s"), "{err:?}");
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    assert_eq!(pools(&c).await.pools[0].slots_busy, 0);
    // Once it runs again, the pool serves (after its node's next heartbeat clears the mark).
    let again = submit(&c, &long_task(4)).await;
    let f = frames(c.events(&again.streams.sse).await.unwrap()).await;
    assert!(end_of(&f).tokens_out > 0, "{f:?}");
}

/// The sampler extensions clients of llama.cpp's server, Ollama and vLLM send are honoured on
/// `/v1` and `/v2`, and out of range they are a 400 naming the field.
#[tokio::test]
async fn sampler_extensions_are_honoured_and_checked() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let c = stack.client();
    let chat_with = |extra: Value| {
        let mut body = json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Write one sentence about the sea."}], "max_tokens": 24});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let text = |v: &Value| {
        v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_else(|| panic!("{v}"))
            .to_string()
    };
    let ask = |body: Value| {
        let c = c.clone();
        async move {
            let (status, _, v) = post(&c, "/v1/chat/completions", &body).await;
            (status, v)
        }
    };
    let (status, greedy) = ask(chat_with(json!({"temperature": 0}))).await;
    assert_eq!(status, StatusCode::OK, "{greedy}");
    // A seeded draw at temperature 1 differs from greedy here; with top_k 1 it is greedy.
    let (_, sampled) = ask(chat_with(json!({"temperature": 1.0, "seed": 7}))).await;
    assert_ne!(text(&sampled), text(&greedy), "seed 7 happens to be greedy");
    let (status, top1) = ask(chat_with(
        json!({"temperature": 1.0, "seed": 7, "top_k": 1}),
    ))
    .await;
    assert_eq!(status, StatusCode::OK, "{top1}");
    assert_eq!(text(&top1), text(&greedy));
    // min_p 1 keeps only the most likely token too.
    let (_, minp) = ask(chat_with(
        json!({"temperature": 1.0, "seed": 7, "min_p": 1.0}),
    ))
    .await;
    assert_eq!(text(&minp), text(&greedy));
    // Penalties change a greedy answer (OpenAI's own presence and frequency penalties, and
    // the repetition penalty under both its names).
    for extra in [
        json!({"temperature": 0, "frequency_penalty": 2.0}),
        json!({"temperature": 0, "presence_penalty": 2.0}),
        json!({"temperature": 0, "repeat_penalty": 3.0}),
        json!({"temperature": 0, "repetition_penalty": 3.0}),
    ] {
        let (status, v) = ask(chat_with(extra.clone())).await;
        assert_eq!(status, StatusCode::OK, "{extra}: {v}");
        assert_ne!(text(&v), text(&greedy), "{extra} changed nothing");
    }
    // ignore_eos: the answer runs to max_tokens.
    let (_, v) = ask(chat_with(
        json!({"temperature": 0, "max_tokens": 48, "ignore_eos": true}),
    ))
    .await;
    assert_eq!(v["usage"]["completion_tokens"], 48, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
    // Out of range, contradictory or unknown: 400 naming the parameter.
    for (extra, param) in [
        (json!({"typical_p": 0}), "typical_p"),
        (json!({"presence_penalty": 2.5}), "presence_penalty"),
        (json!({"frequency_penalty": -3}), "frequency_penalty"),
        (json!({"top_k": -1}), "top_k"),
        (json!({"repeat_last_n": -2}), "repeat_last_n"),
        (
            json!({"repeat_penalty": 1.1, "repetition_penalty": 1.2}),
            "repetition_penalty",
        ),
        (json!({"mirostat": 2}), "mirostat"),
    ] {
        let (status, v) = ask(chat_with(extra.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{extra}: {v}");
        assert_eq!(v["error"]["param"], param, "{extra}: {v}");
    }
    // The native API takes the same fields.
    let req = json!({"model_ref": MODEL_ID, "prompt": COUNTING, "max_tokens": 8,
                     "temperature": 1.0, "seed": 7, "top_k": 1, "repeat_last_n": -1});
    let accepted: TaskAccepted = c.post_json("/v2/tasks", &req).await.unwrap();
    let f = frames(c.events(&accepted.streams.sse).await.unwrap()).await;
    assert_eq!(end_of(&f).tokens_out, 8, "{f:?}");
    let (status, _, v) = post(
        &c,
        "/v2/tasks",
        &json!({"model_ref": MODEL_ID, "prompt": COUNTING, "typical_p": 1.5}),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
    assert_eq!(v["field"], "typical_p", "{v}");
}

/// A task takes at most 8 native event streams at once; the 9th is a 429 `RATE_LIMITED` with
/// `Retry-After`, and closing one makes room.
#[tokio::test]
async fn native_event_streams_per_task_are_bounded() {
    let _g = serial();
    let stack = Stack::start(StackOptions::default());
    let c = stack.client();
    let running = submit(&c, &long_task(400)).await;
    let mut open = Vec::new();
    for _ in 0..8 {
        open.push(
            c.events(&running.streams.sse)
                .await
                .expect("a stream within the limit"),
        );
    }
    match c.events(&running.streams.sse).await {
        Err(ClientError::Status {
            status,
            body,
            retry_after,
            ..
        }) => {
            assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
            assert_eq!(body.unwrap().code, ErrorCode::RateLimited);
            assert!(retry_after.is_some());
        }
        Ok(_) => panic!("a 9th stream was opened"),
        Err(e) => panic!("{e}"),
    }
    // Each open stream reads on; one closed makes room for another.
    for s in open.iter_mut() {
        skip_tokens(s, 2).await;
    }
    drop(open.pop());
    let mut again = None;
    for _ in 0..100 {
        match c.events(&running.streams.sse).await {
            Ok(s) => {
                again = Some(s);
                break;
            }
            // The closed stream's pump notices the closed channel when it next sends, inside
            // orchestratord: nothing outside shows that moment, so the answer is asked for again
            // (the 429 is the event; each open stream here replays a backlog, so reading one
            // would not mark a new event either).
            Err(ClientError::Status { status, .. }) if status == StatusCode::TOO_MANY_REQUESTS => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(again.is_some(), "no room after a stream closed");
    c.post_json::<_, Value>(&format!("/v2/tasks/{}/cancel", running.task_id), &json!({}))
        .await
        .unwrap();
}

/// A client that reads its stream a few bytes at a time holds neither the engine nor the slot:
/// the task's log takes the tokens as the engine makes them, the slot is free once the answer
/// is complete, another client is served meanwhile, and the slow one still gets every chunk.
#[tokio::test]
async fn a_slow_reader_holds_neither_the_engine_nor_the_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _g = serial();
    let stack = Stack::start(StackOptions {
        slots: 1,
        ..StackOptions::default()
    });
    let c = stack.client();
    let addr: std::net::SocketAddr = stack.url().trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    let mut slow = socket.connect(addr).await.unwrap();
    let body = serde_json::to_vec(&json!({
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": "Tell me a very long story."}],
        "max_tokens": 400,
        "ignore_eos": true,
        "stream": true,
    }))
    .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {TEST_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body).await.unwrap();
    let mut first = [0u8; 64];
    slow.read_exact(&mut first).await.unwrap();
    assert!(
        first.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&first)
    );
    // Not reading: the answer is still made, and its slot returns.
    let freed = wait_idle(&c, Duration::from_secs(60)).await;
    eprintln!("slot free {freed:?} after the answer was made, with its client reading nothing");
    let (status, _, v) = post(
        &c,
        "/v1/chat/completions",
        &json!({"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // The slow client reads everything, a few bytes at a time.
    let mut rest = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(30), slow.read(&mut buf))
            .await
            .expect("the stream goes on")
            .unwrap();
        rest.extend_from_slice(&buf[..n]);
        if n == 0 || rest.windows(12).any(|w| w == b"data: [DONE]") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&rest);
    let chunks = text.matches("\"delta\":{\"content\":").count();
    assert!(chunks >= 300, "{chunks} text chunks of 400 tokens");
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");
}
