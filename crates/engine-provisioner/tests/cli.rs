//! Runs the real `engine-provisioner` binary against files and a real HTTP server on loopback.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use engine_provisioner::exit;
use llorch_gguf::write::TestModel;
use sha2::{Digest, Sha256};

fn provisioner(args: &[&str]) -> Output {
    provisioner_with(args, &[])
}

fn provisioner_with(args: &[&str], env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_engine-provisioner"))
        .args(args)
        .env("LLORCH_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .expect("run engine-provisioner")
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Files left in the cache's blobs/ and tmp/ folders.
fn cache_files(cache: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let list = |d: PathBuf| -> Vec<PathBuf> {
        std::fs::read_dir(d)
            .map(|r| r.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default()
    };
    (list(cache.join("blobs")), list(cache.join("tmp")))
}

struct Fixture {
    dir: tempfile::TempDir,
    model: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let model = TestModel::default().to_bytes();
        std::fs::write(dir.path().join("tiny.gguf"), &model).unwrap();
        Self { dir, model }
    }
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
    fn cache(&self) -> PathBuf {
        self.dir.path().join("cache")
    }
    fn stage(&self, source: &str, sha256: Option<&str>, extra: &[&str]) -> Output {
        let cache = self.cache().display().to_string();
        let mut args = vec!["stage", "--source", source, "--cache", &cache];
        if let Some(s) = sha256 {
            args.extend(["--sha256", s]);
        }
        args.extend_from_slice(extra);
        provisioner(&args)
    }
}

#[test]
fn a_good_file_is_staged_by_content_and_shared_between_model_ids() {
    let f = Fixture::new();
    let want = sha(&f.model);
    let out = f.stage(&f.path("tiny.gguf"), Some(&want), &["--model-id", "a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["sha256"], want);
    assert_eq!(json["architecture"], "llama");
    assert_eq!(json["context_length"], 256);
    assert_eq!(json["has_chat_template"], true);
    let blob = f.cache().join("blobs").join(format!("sha256-{want}.gguf"));
    assert_eq!(std::fs::read(&blob).unwrap(), f.model);

    // A second id for the same file, from a file: URL, reuses the blob.
    let out = f.stage(
        &format!("file:{}", f.path("tiny.gguf")),
        Some(&want),
        &["--model-id", "b"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["fetched"], false);
    let (blobs, tmp) = cache_files(&f.cache());
    assert_eq!(blobs, vec![blob]);
    assert!(tmp.is_empty());
    for id in ["a", "b"] {
        let m: serde_json::Value = serde_json::from_slice(
            &std::fs::read(f.cache().join(format!("manifests/{id}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(m["sha256"], want);
    }
}

#[test]
fn a_wrong_sha256_is_refused_and_nothing_is_staged() {
    let f = Fixture::new();
    let wrong = "0".repeat(64);
    let out = f.stage(&f.path("tiny.gguf"), Some(&wrong), &[]);
    assert_eq!(
        out.status.code(),
        Some(exit::SHA256_MISMATCH),
        "{}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("sha256 mismatch") && err.contains(&wrong) && err.contains(&sha(&f.model)),
        "{err}"
    );
    let (blobs, tmp) = cache_files(&f.cache());
    assert!(blobs.is_empty() && tmp.is_empty(), "{blobs:?} {tmp:?}");
}

#[test]
fn truncated_non_gguf_and_missing_files_get_their_own_exit_codes() {
    let f = Fixture::new();
    let cut = &f.model[..f.model.len() - 10];
    std::fs::write(f.path("cut.gguf"), cut).unwrap();
    let out = f.stage(&f.path("cut.gguf"), Some(&sha(cut)), &[]);
    assert_eq!(out.status.code(), Some(exit::TRUNCATED), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cut.gguf is truncated"),
        "{}",
        stderr(&out)
    );

    std::fs::write(f.path("notes.txt"), b"just some text, not a model").unwrap();
    let out = f.stage(&f.path("notes.txt"), None, &[]);
    assert_eq!(out.status.code(), Some(exit::NOT_GGUF), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("notes.txt is not a GGUF file"),
        "{}",
        stderr(&out)
    );

    let out = f.stage(&f.path("absent.gguf"), None, &[]);
    assert_eq!(
        out.status.code(),
        Some(exit::SOURCE_MISSING),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("absent.gguf does not exist"),
        "{}",
        stderr(&out)
    );

    let out = f.stage(&f.path("tiny.gguf"), Some("xyz"), &[]);
    assert_eq!(out.status.code(), Some(exit::USAGE), "{}", stderr(&out));

    let (blobs, tmp) = cache_files(&f.cache());
    assert!(blobs.is_empty() && tmp.is_empty(), "{blobs:?} {tmp:?}");
}

/// A one-connection-at-a-time HTTP/1.1 server on loopback. `send` decides how many body bytes
/// go out after a header announcing all of them.
fn serve(body: Vec<u8>, status: &'static str, send: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[..send.min(body.len())]);
            let _ = stream.flush();
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_download_is_verified_while_streaming_and_staged() {
    let f = Fixture::new();
    let url = serve(f.model.clone(), "200 OK", usize::MAX);
    let want = sha(&f.model);
    let out = f.stage(&format!("{url}/models/tiny.gguf"), Some(&want), &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["model_id"], "tiny");
    assert_eq!(json["fetched"], true);
    let (blobs, tmp) = cache_files(&f.cache());
    assert_eq!(blobs.len(), 1);
    assert!(tmp.is_empty());

    // A download with the wrong hash leaves the good blob alone and adds nothing.
    let out = f.stage(&format!("{url}/x.gguf"), Some(&"1".repeat(64)), &[]);
    assert_eq!(
        out.status.code(),
        Some(exit::SHA256_MISMATCH),
        "{}",
        stderr(&out)
    );
    let (blobs, tmp) = cache_files(&f.cache());
    assert_eq!(blobs.len(), 1);
    assert!(tmp.is_empty());
}

#[test]
fn an_interrupted_download_leaves_no_partial_file() {
    let f = Fixture::new();
    let url = serve(f.model.clone(), "200 OK", f.model.len() / 2);
    let out = f.stage(&format!("{url}/tiny.gguf"), Some(&sha(&f.model)), &[]);
    assert_eq!(
        out.status.code(),
        Some(exit::DOWNLOAD_FAILED),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("download of"), "{}", stderr(&out));
    let (blobs, tmp) = cache_files(&f.cache());
    assert!(blobs.is_empty() && tmp.is_empty(), "{blobs:?} {tmp:?}");
}

/// A server that sends the head and part of the body, then holds the connection open and
/// sends nothing more (a stalled mirror, a dead route).
fn serve_stalling(body: Vec<u8>, send: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).unwrap() > 2 {
                line.clear();
            }
            let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body[..send]);
            let _ = stream.flush();
            held.push(stream);
        }
    });
    format!("http://{addr}")
}

#[test]
fn a_stalled_download_fails_after_the_stall_bound_and_leaves_nothing() {
    let f = Fixture::new();
    let url = serve_stalling(f.model.clone(), f.model.len() / 2);
    let cache = f.cache().display().to_string();
    let source = format!("{url}/tiny.gguf");
    let want = sha(&f.model);
    let start = std::time::Instant::now();
    let out = provisioner_with(
        &[
            "stage", "--source", &source, "--cache", &cache, "--sha256", &want,
        ],
        &[("LLORCH_DOWNLOAD_STALL_SECS", "1")],
    );
    let took = start.elapsed();
    assert_eq!(
        out.status.code(),
        Some(exit::DOWNLOAD_FAILED),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("no data for 1 s"), "{}", stderr(&out));
    assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    let (blobs, tmp) = cache_files(&f.cache());
    assert!(blobs.is_empty() && tmp.is_empty(), "{blobs:?} {tmp:?}");
}

#[test]
fn downloads_must_be_pinned_and_http_errors_are_reported() {
    let f = Fixture::new();
    let url = serve(b"nope".to_vec(), "404 Not Found", usize::MAX);
    let out = f.stage(&format!("{url}/tiny.gguf"), None, &[]);
    assert_eq!(out.status.code(), Some(exit::USAGE), "{}", stderr(&out));
    assert!(stderr(&out).contains("pinned"), "{}", stderr(&out));
    let out = f.stage(&format!("{url}/tiny.gguf"), Some(&sha(&f.model)), &[]);
    assert_eq!(
        out.status.code(),
        Some(exit::DOWNLOAD_FAILED),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));
}

#[test]
fn downloads_are_bounded_in_size_and_plain_http_only_to_loopback_unless_allowed() {
    let f = Fixture::new();
    let model = f.model.clone();
    let sum = sha(&f.model);
    // Plain http:// to another host: refused before any connection, naming the switch.
    let out = f.stage("http://models.example.invalid/tiny.gguf", Some(&sum), &[]);
    assert_eq!(out.status.code(), Some(exit::USAGE), "{}", stderr(&out));
    assert!(stderr(&out).contains("--allow-http"), "{}", stderr(&out));
    // Allowed, it is tried (and fails here for want of the host, not of the rule).
    let out = f.stage(
        "http://models.example.invalid/tiny.gguf",
        Some(&sum),
        &["--allow-http"],
    );
    assert_eq!(
        out.status.code(),
        Some(exit::DOWNLOAD_FAILED),
        "{}",
        stderr(&out)
    );
    // Larger than the bound: refused from its announced length, nothing staged.
    let url = serve(model.clone(), "200 OK", usize::MAX);
    let small = (model.len() - 1).to_string();
    let out = f.stage(
        &format!("{url}/tiny.gguf"),
        Some(&sum),
        &["--max-download-bytes", &small],
    );
    assert_eq!(
        out.status.code(),
        Some(exit::DOWNLOAD_FAILED),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("allowed"), "{}", stderr(&out));
    assert!(!f
        .cache()
        .join("blobs")
        .join(format!("sha256-{sum}.gguf"))
        .exists());
    // Within it (loopback http:// needs no switch): staged.
    let url = serve(model.clone(), "200 OK", usize::MAX);
    let enough = model.len().to_string();
    let out = f.stage(
        &format!("{url}/tiny.gguf"),
        Some(&sum),
        &["--max-download-bytes", &enough],
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn plan_writes_what_the_engine_reads() {
    let f = Fixture::new();
    let plan = f.path("plan.json");
    let cache = f.cache().display().to_string();
    let source = f.path("tiny.gguf");
    let out = provisioner(&[
        "plan",
        "--source",
        &source,
        "--sha256",
        &sha(&f.model),
        "--cache",
        &cache,
        "--model-id",
        "tiny",
        "--pool",
        "p0",
        "--slots",
        "2",
        "--ctx",
        "512",
        "--socket",
        "/run/x/p0.sock",
        "--handoff-dir",
        "/run/x/handoff",
        "--out",
        &plan,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let parsed: llorch_wire::plan::EnginePlan =
        serde_json::from_slice(&std::fs::read(&plan).unwrap()).unwrap();
    assert_eq!(parsed.pool_id, "p0");
    assert_eq!(parsed.slots, 2);
    assert_eq!(parsed.model.sha256, sha(&f.model));
    assert!(Path::new(&parsed.model.path).exists());
}

/// A small llama-shaped model (4 layers, 256 wide, F32), header and zeroed data.
fn small_llama(path: &Path) {
    use llorch_gguf::write::{ggml::F32, Header, LlamaShape};
    let h = Header::llama(LlamaShape {
        layers: 4,
        embd: 256,
        ff: 1024,
        heads: 4,
        kv_heads: 4,
        vocab: 1000,
        ty: F32,
        output_ty: F32,
    });
    let file = std::fs::File::create(path).unwrap();
    (&file).write_all(&h.to_bytes()).unwrap();
    file.set_len(h.required_size()).unwrap();
}

#[test]
fn a_gpu_pool_is_fitted_to_its_gpus_free_memory_or_refused_with_the_numbers() {
    let f = Fixture::new();
    small_llama(&f.dir.path().join("small.gguf"));
    let cache = f.cache().display().to_string();
    let source = f.path("small.gguf");
    let plan = f.path("plan.json");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "plan",
            "--source",
            &source,
            "--cache",
            &cache,
            "--pool",
            "g0",
            "--slots",
            "2",
            "--ctx",
            "1024",
            "--gpu-layers",
            "999",
            "--socket",
            "/run/x/g0.sock",
            "--handoff-dir",
            "/run/x/handoff",
            "--out",
            &plan,
        ];
        args.extend_from_slice(extra);
        provisioner(&args)
    };
    let read = || -> llorch_wire::plan::EnginePlan {
        serde_json::from_slice(&std::fs::read(&plan).unwrap()).unwrap()
    };
    // Plenty free on two GPUs: every layer offloaded, each GPU's share in the plan.
    let out = run(&["--gpu-free-mib", "2000,1000"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let p = read();
    assert_eq!(p.gpu_layers, 999);
    let m = p.memory.expect("a memory estimate");
    assert_eq!((m.layers, m.offloaded_layers), (4, 4));
    assert_eq!(m.per_gpu_bytes.len(), 2);
    assert_eq!(m.gpu_free_bytes, [2000 << 20, 1000 << 20]);
    assert_eq!(m.gpu_kv_bytes, 4 * 2 * 256 * 2 * 2 * 1024);
    assert!(m
        .per_gpu_bytes
        .iter()
        .zip(&m.gpu_free_bytes)
        .all(|(n, f)| n <= f));
    // Too little: without gpu_only the layers that fit (here none) go to the GPU, said on
    // stderr; with gpu_only the pool is refused (78) with every number, also in plan.json.error.
    let out = run(&["--gpu-free-mib", "300"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(read().gpu_layers < 4);
    assert!(
        stderr(&out).contains("does not fit its GPUs"),
        "{}",
        stderr(&out)
    );
    let out = run(&["--gpu-free-mib", "300", "--gpu-only"]);
    assert_eq!(
        out.status.code(),
        Some(exit::DOES_NOT_FIT),
        "{}",
        stderr(&out)
    );
    let said = std::fs::read_to_string(format!("{plan}.error")).unwrap();
    for part in [
        "pool g0 does not fit",
        "GPU 0: needs",
        "has 300.00 MiB free",
        "KV cache 8.00 MiB (2 slots x 1024 tokens)",
        "lower ctx or slots",
    ] {
        assert!(said.contains(part), "{part:?} not in {said}");
    }
    // Free memory unknown (no NVML): planned, not checked.
    let out = run(&[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let p = read();
    assert_eq!(p.gpu_layers, 999);
    let m = p.memory.expect("a memory estimate");
    assert_eq!((m.offloaded_layers, m.per_gpu_bytes.len()), (4, 0));
    assert!(m.gpu_weights_bytes > 0);
}
