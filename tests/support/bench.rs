//! What the benches share: settings from the environment, order statistics, the machine's
//! load.

pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The value at quantile `q` (nearest rank) of `v`, in any order.
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// `/proc/loadavg`'s first three fields: how busy the (shared) machine was.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Starts the built `pool-managerd` on `config`, telling `notify` what it tells its service
/// manager and logging to `<dir>/pool-managerd.log`; returns it with a client of its node API,
/// which the configuration must put at `unix:<dir>/node.sock`.
pub fn spawn_pool_managerd(
    dir: &std::path::Path,
    config: &std::path::Path,
    notify: &crate::notify::NotifySocket,
) -> (std::process::Child, llorch_client::HttpClient) {
    let child = std::process::Command::new(crate::bin("pool-managerd"))
        .arg("--config")
        .arg(config)
        .env("NOTIFY_SOCKET", &notify.path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("pool-managerd.log")).expect("a log file"))
        .spawn()
        .expect("pool-managerd starts");
    let client = llorch_client::HttpClient::new(&format!("unix:{}/node.sock", dir.display()))
        .expect("a unix address");
    (child, client)
}

/// Sends `body` to an engine-protocol `path` (an engine's `/generate`, or a node's
/// `/v2/pools/{id}/generate`); returns the time to its first token, after reading the whole
/// answer, which must succeed.
pub async fn first_token(
    client: &llorch_client::HttpClient,
    path: &str,
    body: &'static str,
) -> std::time::Duration {
    use llorch_wire::engine::EngineEvent;
    let sent = std::time::Instant::now();
    let resp = client.post_raw(path, body, &[]).await.expect("an answer");
    assert_eq!(resp.status(), 200, "{path}");
    let mut events = llorch_client::EventStream::from_response(resp, std::path::Path::new("node"))
        .await
        .expect("an event stream");
    let mut first = None;
    while let Some(ev) = events.next_event().await {
        match ev.expect("a valid event") {
            EngineEvent::Token(_) => {
                first.get_or_insert_with(|| sent.elapsed());
            }
            EngineEvent::End(_) => break,
            EngineEvent::Error(e) => panic!("the engine failed: {e:?}"),
        }
    }
    first.expect("a token")
}
