//! `llorch up`: the home profile without systemd. Writes a node configuration for one pool,
//! starts orchestratord and pool-managerd (which starts the provisioner and the engine) as child
//! processes, waits until a pool is ready, prints the endpoint, and on Ctrl-C (or SIGTERM)
//! stops pool-managerd first (it stops its engines, which remove their handoff files), then
//! orchestratord.
//!
//! The children run in their own process group, so a Ctrl-C in the terminal reaches only
//! `llorch up`, which stops them in order; and each is told by the kernel to exit if `llorch up`
//! itself dies, so nothing is left running.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use llorch_client::HttpClient;
use tokio::process::{Child, Command};

pub struct UpOptions {
    pub model: PathBuf,
    pub sha256: Option<String>,
    pub model_id: String,
    pub listen: SocketAddr,
    pub slots: u32,
    pub ctx: u32,
    pub cache: PathBuf,
    pub runtime_dir: Option<PathBuf>,
    /// Extra flags for orchestratord (`--api-keys`, `--queue-capacity`, …).
    pub orchestratord_args: Vec<String>,
    /// The daemons' D-Bus (`--dbus`; `off` unless asked: a user's stack cannot own the
    /// names on the system bus).
    pub dbus: llorch_bus::Mode,
}

/// A binary next to this executable, else from `PATH`.
pub fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn toml_str(s: &str) -> String {
    // TOML basic strings share JSON's escapes for everything a path can hold.
    serde_json::to_string(s).expect("strings serialize")
}

/// The node configuration `llorch up` writes for pool-managerd.
pub fn node_config(opts: &UpOptions, runtime: &Path, token_file: &Path) -> String {
    let sha = opts
        .sha256
        .as_deref()
        .map(|s| format!("sha256 = {}\n", toml_str(s)))
        .unwrap_or_default();
    format!(
        r#"# Written by `llorch up`.
[node]
id = "home"
control_plane = "http://{listen}"
listen = {node_sock}
cache_dir = {cache}
runtime_dir = {runtime}
heartbeat_secs = 5
# Written fresh by every `llorch up`; orchestratord accepts only this node's registration.
token_file = {token_file}
# Engines are children of pool-managerd here, whatever runs `llorch up`.
launcher = "process"
engine_bin = {engine}
provisioner_bin = {provisioner}

[[pools]]
id = "default"
slots = {slots}
ctx = {ctx}
devices = "cpu"

[pools.model]
id = {model_id}
source = {source}
{sha}"#,
        listen = opts.listen,
        node_sock = toml_str(&format!(
            "unix:{}",
            runtime.join("pool-managerd.sock").display()
        )),
        cache = toml_str(&opts.cache.display().to_string()),
        runtime = toml_str(&runtime.display().to_string()),
        token_file = toml_str(&token_file.display().to_string()),
        engine = toml_str(&sibling("llorch-engine").display().to_string()),
        provisioner = toml_str(&sibling("engine-provisioner").display().to_string()),
        slots = opts.slots,
        ctx = opts.ctx,
        model_id = toml_str(&opts.model_id),
        source = toml_str(&opts.model.display().to_string()),
    )
}

/// A child daemon: stopped with SIGTERM and waited for when dropped or stopped.
struct Daemon {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &'static str, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        Self::spawn_with_listener(name, args, log, None)
    }

    /// Spawns `name`, handing it `listener` as its socket-activated socket `fd name`.
    fn spawn_with_listener(
        name: &'static str,
        args: &[String],
        log: PathBuf,
        listener: Option<(&std::net::TcpListener, &str)>,
    ) -> anyhow::Result<Self> {
        let mut cmd = Command::new(sibling(name));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?,
            )
            .process_group(0)
            .kill_on_drop(true);
        // A killed `llorch up` leaves nothing running.
        llorch_os::process::die_with_parent(cmd.as_std_mut(), libc::SIGTERM);
        if let Some((l, fd_name)) = listener {
            llorch_os::process::pass_listener(cmd.as_std_mut(), l, fd_name);
        }
        let child = cmd.spawn().with_context(|| {
            format!("cannot start {name} (build it with `cargo build --workspace`)")
        })?;
        Ok(Self { name, child, log })
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(pid) = self.child.id() {
            // Our own child, which we have not reaped.
            llorch_os::process::terminate_child(pid);
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(status) => {
                let status = status?;
                if !status.success() {
                    eprintln!(
                        "llorch: {} exited with {status}:\n{}",
                        self.name,
                        self.tail()
                    );
                }
            }
            Err(_) => {
                eprintln!("llorch: {} did not stop within 30 s; killing it", self.name);
                self.child.kill().await?;
            }
        }
        Ok(())
    }
}

async fn wait_until_ready(client: &HttpClient, daemons: &mut [&mut Daemon]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(600);
    let mut last_state = String::new();
    loop {
        for d in daemons.iter_mut() {
            if let Some(status) = d.child.try_wait()? {
                bail!(
                    "{} exited with {status} before the stack was ready:\n{}",
                    d.name,
                    d.tail()
                );
            }
        }
        if let Ok(pools) = client
            .get_json::<llorch_wire::task::PoolsAnswer>("/v2/pools")
            .await
        {
            if pools
                .pools
                .iter()
                .any(|p| p.state == llorch_wire::node::PoolState::Ready)
            {
                return Ok(());
            }
            let state: Vec<String> = pools
                .pools
                .iter()
                .map(|p| {
                    format!(
                        "{} {}{}",
                        p.pool_id,
                        p.state,
                        p.last_error
                            .as_deref()
                            .map(|e| format!(" ({e})"))
                            .unwrap_or_default()
                    )
                })
                .collect();
            let state = state.join(", ");
            if !state.is_empty() && state != last_state {
                eprintln!("llorch: pool {state}");
                last_state = state;
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("no pool was ready after 600 s; see the logs");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes a new node token for this run: `node-token` (pool-managerd's `token_file`) and
/// `node-tokens` (orchestratord's `--node-tokens`, one `home TOKEN` line), both mode 0600.
/// Files of an earlier run in the same runtime directory are replaced.
pub fn node_token_files(runtime: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let token = llorch_os::service::random_token().context("read /dev/urandom")?;
    let token_file = runtime.join("node-token");
    let tokens_file = runtime.join("node-tokens");
    for (path, text) in [
        (&token_file, format!("{token}\n")),
        (&tokens_file, format!("home {token}\n")),
    ] {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("remove {}", path.display()))
            }
            _ => {}
        }
        llorch_os::service::write_secret(path, &text)
            .with_context(|| format!("write {}", path.display()))?;
    }
    Ok((token_file, tokens_file))
}

/// What `llorch up` prints once the stack serves: the endpoints, a request to try and the
/// web console (tests/support/up.rs reads these three lines).
fn announce(url: &str, model_id: &str, admin_token: &Path) {
    println!(
        "llama-orch is serving {model_id} at {url}/v1 (OpenAI), {url} (Anthropic and Ollama clients) and {url}/v2 (native)"
    );
    println!(
        "try: curl -s {url}/v1/chat/completions -H 'content-type: application/json' -d '{{\"model\":\"{model_id}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hello!\"}}]}}'"
    );
    println!(
        "console: {url}/ui/ in a browser on this machine; for operator actions paste the admin token from {}",
        admin_token.display()
    );
}

/// Where `llorch up` leaves the operator's token of the stack on `port` for `llorch` to send:
/// `$XDG_RUNTIME_DIR/llama-orch/admin-PORT.token`, else under `~/.cache/llama-orch/run/`, in a
/// directory only this user can enter.
pub fn admin_token_path(port: u16) -> PathBuf {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| PathBuf::from(d).join("llama-orch"))
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/llama-orch/run"))
        })
        .unwrap_or_else(|| std::env::temp_dir().join("llama-orch-run"));
    base.join(format!("admin-{port}.token"))
}

/// The operator's token to send to `url`: `$LLORCH_ADMIN_TOKEN`, else, for a loopback URL, the
/// one `llorch up` wrote for its port.
pub fn admin_token_for(url: &str) -> Option<String> {
    if let Some(t) = std::env::var("LLORCH_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        return Some(t);
    }
    let uri: hyper::Uri = url.parse().ok()?;
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return None;
    }
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let text = std::fs::read_to_string(admin_token_path(port)).ok()?;
    text.lines()
        .next()
        .map(|l| l.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Writes a fresh operator token for the stack on `port` (mode 0600, in a directory of mode
/// 0700), replacing one an earlier run left.
fn write_admin_token(port: u16) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let path = admin_token_path(port);
    let dir = path.parent().expect("a file in a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("chmod 0700 {}", dir.display()))?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", path.display()))
        }
        _ => {}
    }
    let token = llorch_os::service::random_token().context("read /dev/urandom")?;
    llorch_os::service::write_secret(&path, &format!("{token}\n"))
        .with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

pub async fn run(mut opts: UpOptions) -> anyhow::Result<()> {
    if !opts.model.exists() {
        bail!(
            "model file {} does not exist; run scripts/setup.sh (or `make setup`) to fetch the default model, or give --model PATH",
            opts.model.display()
        );
    }
    let tmp;
    let runtime = match &opts.runtime_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("create {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("llorch-up-").tempdir()?;
            tmp.path().to_owned()
        }
    };
    let logs = runtime.join("logs");
    std::fs::create_dir_all(&logs)?;
    // Only this stack's own pool-managerd may register: a fresh node token, readable by this
    // user alone, that orchestratord requires and pool-managerd presents. Without it any local
    // process (or a web page that can POST to 127.0.0.1) could register a node and receive
    // the prompts.
    let (token_file, tokens_file) = node_token_files(&runtime)?;
    // The API's socket is bound here and handed to orchestratord (as systemd's socket
    // activation would), so `--listen 127.0.0.1:0` gets a free port that pool-managerd's
    // configuration and the printed URL can name.
    let api = std::net::TcpListener::bind(opts.listen)
        .with_context(|| format!("cannot listen on {}", opts.listen))?;
    opts.listen = api.local_addr()?;
    let config_path = runtime.join("node.toml");
    std::fs::write(&config_path, node_config(&opts, &runtime, &token_file))?;
    // The operator's credential: without API keys every other caller is an anonymous client
    // (a web page can reach 127.0.0.1 too), and `llorch` finds this file by the port.
    let admin_token = write_admin_token(opts.listen.port())?;

    // Listen for Ctrl-C and SIGTERM once, for the whole run, so no signal falls between two
    // waits.
    let stop = tokio_util::sync::CancellationToken::new();
    llorch_os::service::cancel_on_stop_signal(stop.clone())?;
    let mut orch_args = vec![
        "--listen".to_string(),
        opts.listen.to_string(),
        "--node-tokens".to_string(),
        tokens_file.display().to_string(),
        "--admin-token-file".to_string(),
        admin_token.display().to_string(),
        "--dbus".to_string(),
        opts.dbus.to_string(),
    ];
    orch_args.extend(opts.orchestratord_args.iter().cloned());
    let mut orch = Daemon::spawn_with_listener(
        "orchestratord",
        &orch_args,
        logs.join("orchestratord.log"),
        Some((&api, "api")),
    )?;
    drop(api);
    let mut node = Daemon::spawn(
        "pool-managerd",
        &[
            "--config".to_string(),
            config_path.display().to_string(),
            "--dbus".to_string(),
            opts.dbus.to_string(),
        ],
        logs.join("pool-managerd.log"),
    )?;
    eprintln!(
        "llorch: starting orchestratord on {} and pool-managerd (model {}, {} slots); logs in {}",
        opts.listen,
        opts.model_id,
        opts.slots,
        logs.display()
    );
    let url = format!("http://{}", opts.listen);
    let key = std::env::var("LLORCH_API_KEY").ok();
    let client = HttpClient::new(&url)?.with_token(key);
    let mut both = [&mut orch, &mut node];
    let ready = tokio::select! {
        r = wait_until_ready(&client, &mut both) => r,
        _ = stop.cancelled() => Err(anyhow::anyhow!("interrupted before the stack was ready")),
    };
    if let Err(e) = ready {
        node.stop().await?;
        orch.stop().await?;
        let _ = std::fs::remove_file(&admin_token);
        return Err(e);
    }
    announce(&url, &opts.model_id, &admin_token);
    eprintln!("llorch: Ctrl-C stops everything.");
    let exited = tokio::select! {
        _ = stop.cancelled() => None,
        s = orch.child.wait() => Some(("orchestratord", s)),
        s = node.child.wait() => Some(("pool-managerd", s)),
    };
    if let Some((name, status)) = exited {
        eprintln!("llorch: {name} exited unexpectedly ({status:?}); stopping the rest");
    } else {
        eprintln!("llorch: stopping");
    }
    // Stop both even if stopping the first fails.
    let node_stopped = node.stop().await;
    let orch_stopped = orch.stop().await;
    let _ = std::fs::remove_file(&admin_token);
    orch_stopped?;
    node_stopped?;
    eprintln!("llorch: stopped");
    Ok(())
}
