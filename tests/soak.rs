//! `make soak` (SOAK_MINUTES, default 20): the home stack (`llorch up`'s daemons as processes,
//! 4 slots on the default model) under an open loop of native tasks at about 80% of the
//! capacity it measures first, with mixed endings: 1 task in 10 cancelled (`POST
//! …/cancel`) after its first token, 1 in 10 abandoned by its client after three tokens (the
//! task runs on), the rest read to `end`. Every 30 s it prints the resident memory and the
//! open file descriptors of orchestratord, pool-managerd and the engine. It fails (exit 1)
//! when a task hung or ended without its last word, or when a daemon's memory grew by more
//! than 10% + 8 MiB or its descriptors by more than 8 between the baseline and the last
//! sample. The baseline is the sample at 6 minutes (half the soak when it is shorter):
//! orchestratord keeps finished tasks for 5 minutes (`RETAIN_FINISHED`), so its memory rises
//! until then by design and is flat after. Method and numbers: docs/OPERATIONS.md.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use llorch_client::HttpClient;
use llorch_tests::stack::{Stack, StackOptions, MODEL_ID};
use llorch_wire::task::TaskAccepted;
use serde_json::json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    End,
    Canceled,
    Abandoned,
    Refused,
    Error,
    Broken,
    Hung,
}

/// One task; `how` 0: cancel after the first token, 1: abandon after three, else read all.
async fn task(c: &HttpClient, how: usize) -> Outcome {
    let body = json!({"model_ref": MODEL_ID, "prompt": "Write about the sea:", "max_tokens": 32, "temperature": 0.7});
    let run = async {
        let Ok(t) = c.post_json::<_, TaskAccepted>("/v2/tasks", &body).await else {
            return Outcome::Refused;
        };
        let Ok(mut s) = c.events(&t.streams.sse).await else {
            return Outcome::Broken;
        };
        let mut tokens = 0;
        loop {
            match s.next_frame().await {
                None => return Outcome::Broken,
                Some(Err(_)) => return Outcome::Broken,
                Some(Ok(f)) => match f.event.as_str() {
                    "end" => return Outcome::End,
                    "error" if f.data.contains("CANCELED") => return Outcome::Canceled,
                    "error" => return Outcome::Error,
                    "token" => {
                        tokens += 1;
                        if how == 0 && tokens == 1 {
                            let path = format!("/v2/tasks/{}/cancel", t.task_id);
                            if c.post_raw(&path, Vec::new(), &[]).await.is_err() {
                                return Outcome::Broken;
                            }
                        }
                        if how == 1 && tokens == 3 {
                            return Outcome::Abandoned;
                        }
                    }
                    _ => {}
                },
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .unwrap_or(Outcome::Hung)
}

/// Resident memory (KiB) and open descriptors of a process.
fn usage(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss, fds)
}

/// Resident memory (KiB) and open descriptors of each daemon, sampled at a time.
type Samples = Vec<(Duration, Vec<(u64, usize)>)>;

fn main() {
    let minutes: f64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(20.0);
    let mut stack = Stack::start(StackOptions {
        slots: 4,
        queue_capacity: 256,
        ..StackOptions::default()
    });
    stack.wait_ready();
    let pids = [
        ("orchestratord", stack.orch.as_ref().unwrap().pid()),
        ("pool-managerd", stack.node.as_ref().unwrap().pid()),
        ("engine", stack.handoff().expect("ready engine").pid),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = stack.client();

    let capacity = capacity(&rt, &client);
    let rate = 0.8 * capacity;
    println!("soak: capacity {capacity:.2} tasks/s (32 tokens each, 4 slots); offering {rate:.2} tasks/s for {minutes} min");
    let (outcomes, mut samples, began) = soak(&rt, &client, &pids, rate, minutes);
    // Settled: the last sample once every task is over, the abandoned ones too (they run on
    // after their clients left): no slot busy, nothing queued or running.
    llorch_tests::wait_for("the stack idle", Duration::from_secs(120), || {
        stack.pools_blocking().is_some_and(|p| {
            p.queue.depth == 0 && p.queue.running == 0 && p.pools.iter().all(|p| p.slots_busy == 0)
        })
    });
    samples.push((
        began.elapsed(),
        pids.iter().map(|(_, p)| usage(*p)).collect(),
    ));
    let failed = verdict(&outcomes, &samples, &pids, minutes);
    drop(stack);
    if !failed.is_empty() {
        println!("soak: FAILED: {}", failed.join("; "));
        std::process::exit(1);
    }
    println!("soak: passed");
}

/// Tasks per second the stack serves: 4 clients back to back for 30 s, every task read to its end.
fn capacity(rt: &tokio::runtime::Runtime, client: &HttpClient) -> f64 {
    // Capacity: 4 clients back to back for 30 s, every task read to its end.
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    rt.block_on(async {
        let mut all = Vec::new();
        for _ in 0..4 {
            let (c, done) = (client.clone(), done.clone());
            all.push(tokio::spawn(async move {
                while start.elapsed() < Duration::from_secs(30) {
                    if task(&c, 9).await == Outcome::End {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }));
        }
        for h in all {
            h.await.unwrap();
        }
    });
    done.load(Ordering::SeqCst) as f64 / start.elapsed().as_secs_f64()
}

fn soak(
    rt: &tokio::runtime::Runtime,
    client: &HttpClient,
    pids: &[(&str, u32)],
    rate: f64,
    minutes: f64,
) -> (Vec<Outcome>, Samples, Instant) {
    // The soak: one arrival every 1/rate s, each task on its own.
    let interval = Duration::from_secs_f64(1.0 / rate);
    let until = Instant::now() + Duration::from_secs_f64(minutes * 60.0);
    let mut samples: Samples = Vec::new();
    let began = Instant::now();
    let outcomes = rt.block_on(async {
        let mut handles = Vec::new();
        let mut next_sample = began + Duration::from_secs(60);
        let mut i = 0usize;
        let mut tick = tokio::time::interval(interval);
        while Instant::now() < until {
            tick.tick().await;
            let c = client.clone();
            let how = i % 10;
            handles.push(tokio::spawn(async move { task(&c, how).await }));
            i += 1;
            if Instant::now() >= next_sample {
                let row: Vec<(u64, usize)> = pids.iter().map(|(_, p)| usage(*p)).collect();
                println!(
                    "soak: {:>5.1} min  {}",
                    began.elapsed().as_secs_f64() / 60.0,
                    pids.iter()
                        .zip(&row)
                        .map(|((n, _), (rss, fds))| format!("{n} {} MiB {fds} fds", rss / 1024))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                samples.push((began.elapsed(), row));
                next_sample += Duration::from_secs(30);
            }
        }
        let mut outcomes = Vec::new();
        for h in handles {
            outcomes.push(h.await.unwrap());
        }
        outcomes
    });
    (outcomes, samples, began)
}

/// What failed: broken or hung tasks, and memory or descriptors that grew from the baseline to the last sample.
fn verdict(
    outcomes: &[Outcome],
    samples: &Samples,
    pids: &[(&str, u32)],
    minutes: f64,
) -> Vec<String> {
    let mut tally = std::collections::BTreeMap::new();
    for o in outcomes {
        *tally.entry(*o).or_insert(0u32) += 1;
    }
    println!("soak: {} tasks: {tally:?}", outcomes.len());
    let mut failed = Vec::new();
    for bad in [Outcome::Broken, Outcome::Hung] {
        if tally.contains_key(&bad) {
            failed.push(format!("{} tasks {bad:?}", tally[&bad]));
        }
    }
    // The baseline: the first sample once finished tasks have filled their 5-minute window.
    let settle = Duration::from_secs_f64((minutes * 30.0).min(360.0));
    let base = samples
        .iter()
        .position(|(at, _)| *at >= settle)
        .unwrap_or(0);
    println!(
        "soak: baseline at {:.1} min",
        samples[base].0.as_secs_f64() / 60.0
    );
    let (first, last) = (&samples[base].1, &samples[samples.len() - 1].1);
    for (k, (name, _)) in pids.iter().enumerate() {
        let ((rss0, fd0), (rss1, fd1)) = (first[k], last[k]);
        println!(
            "soak: {name}: {} -> {} MiB resident, {fd0} -> {fd1} descriptors",
            rss0 / 1024,
            rss1 / 1024
        );
        if rss1 as f64 > rss0 as f64 * 1.10 + 8.0 * 1024.0 {
            failed.push(format!("{name}'s memory grew from {rss0} to {rss1} KiB"));
        }
        if fd1 > fd0 + 8 {
            failed.push(format!("{name}'s descriptors grew from {fd0} to {fd1}"));
        }
    }
    failed
}
