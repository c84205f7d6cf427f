//! Reading Prometheus text expositions and the metric reference (docs/METRICS.md) in tests.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// Family name → type, from `# TYPE` lines.
    pub types: HashMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// Parses the text format; panics with the line on anything malformed, and on a family
    /// announced twice (an invalid exposition).
    pub fn parse(text: &str) -> Self {
        let mut s = Self::default();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE line");
                assert!(
                    s.types.insert(name.into(), kind.into()).is_none(),
                    "family {name} announced twice"
                );
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            s.samples.push(parse_sample(line));
        }
        s
    }

    /// The samples of family `name` (with the `_bucket`/`_sum`/`_count` series of a histogram).
    pub fn family(&self, name: &str) -> Vec<&Sample> {
        let hist = self.types.get(name).map(String::as_str) == Some("histogram");
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    || (hist
                        && ["_bucket", "_sum", "_count"]
                            .iter()
                            .any(|suf| s.name == format!("{name}{suf}")))
            })
            .collect()
    }

    /// The sum of the samples named exactly `name` whose labels include `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Whether a sample named exactly `name` with these labels (among others) exists.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.samples.iter().any(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// Every sample as `name{labels}` → value, without the families `skip` accepts.
    pub fn values(&self, skip: impl Fn(&str) -> bool) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|s| !skip(&s.name))
            .map(|s| (format!("{}{:?}", s.name, s.labels), s.value))
            .collect()
    }

    /// Family names (from `# TYPE`).
    pub fn names(&self) -> BTreeSet<String> {
        self.types.keys().cloned().collect()
    }
}

fn bad(line: &str) -> ! {
    panic!("malformed sample line: {line:?}")
}

fn parse_sample(line: &str) -> Sample {
    let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad(line));
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(r) = rest.strip_prefix('{') {
        let mut chars = r.char_indices().peekable();
        let end;
        loop {
            // label name
            let Some(&(start, c)) = chars.peek() else {
                bad(line)
            };
            if c == '}' {
                end = start + 1;
                break;
            }
            let mut key = String::new();
            while let Some(&(_, c)) = chars.peek() {
                if c == '=' {
                    break;
                }
                key.push(c);
                chars.next();
            }
            chars.next(); // '='
            if chars.next().map(|(_, c)| c) != Some('"') {
                bad(line);
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c)) => value.push(c),
                        None => bad(line),
                    },
                    Some((_, '"')) => break,
                    Some((_, c)) => value.push(c),
                    None => bad(line),
                }
            }
            assert!(
                labels.insert(key.clone(), value).is_none(),
                "label {key} twice in {line:?}"
            );
            match chars.next() {
                Some((_, ',')) => continue,
                Some((i, '}')) => {
                    end = i + 1;
                    break;
                }
                _ => bad(line),
            }
        }
        rest = &r[end..];
    }
    let value = rest.split_whitespace().next().unwrap_or_else(|| bad(line));
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().unwrap_or_else(|_| bad(line)),
    };
    Sample {
        name,
        labels,
        value,
    }
}

/// Waits (at most `limit`) until the sum of `name` over the samples with `labels` is `want`.
pub async fn wait_sum(
    client: &llorch_client::HttpClient,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
    limit: std::time::Duration,
) {
    crate::wait_until(
        &format!("{name}{labels:?} to be {want}"),
        limit,
        || async move {
            let n = scrape(client).await.sum(name, labels);
            (n == want).then_some(()).ok_or(format!("{n}"))
        },
    )
    .await;
}

/// One scrape of `GET /metrics`, checked for its status and the text format's content type.
pub async fn scrape(client: &llorch_client::HttpClient) -> Scrape {
    use http_body_util::BodyExt;
    let req = client
        .request(hyper::Method::GET, "/metrics")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .expect("valid request");
    let resp = client.send(req).await.expect("scrape");
    let status = resp.status();
    let ctype = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or("").to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let text = String::from_utf8(body.to_vec()).expect("UTF-8");
    assert_eq!(status, hyper::StatusCode::OK, "{text}");
    assert!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    Scrape::parse(&text)
}

/// A row of the reference tables in docs/METRICS.md.
#[derive(Debug, Clone)]
pub struct Documented {
    /// `orchestratord`, `pool-managerd` or `llorch-engine`.
    pub role: String,
    pub name: String,
    pub kind: String,
    pub labels: Vec<String>,
    /// Exported only where NVML loads (a GPU node).
    pub nvml_only: bool,
}

/// The metric tables of docs/METRICS.md.
pub fn documented() -> Vec<Documented> {
    let text =
        std::fs::read_to_string(crate::repo_root().join("docs/METRICS.md")).expect("METRICS.md");
    let mut role = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            role = h.split_whitespace().next().unwrap_or("").to_string();
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | `name` | type | labels | meaning |
        if cells.len() < 6 || !cells[1].starts_with("`llorch_") {
            continue;
        }
        let tick = |s: &str| s.trim_matches('`').to_string();
        out.push(Documented {
            role: role.clone(),
            name: tick(cells[1]),
            kind: cells[2].to_string(),
            labels: cells[3]
                .split(',')
                .map(|l| tick(l.trim()))
                .filter(|l| !l.is_empty())
                .collect(),
            nvml_only: cells[4].starts_with("NVML only"),
        });
    }
    out
}

/// The `llorch_*` metric names an expression text uses, histogram suffixes removed.
pub fn names_used(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("llorch_") {
        let start = i + pos;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        if before_ok {
            let mut name = &text[start..end];
            for suf in ["_bucket", "_sum", "_count"] {
                if let Some(n) = name.strip_suffix(suf) {
                    name = n;
                }
            }
            out.insert(name.to_string());
        }
        i = end.max(start + 1);
    }
    out
}
