//! The shape of the source that keeps it easy to change (issue 26, docs/ARCHITECTURE.md,
//! "Layout rules"), checked on every crate under `crates/`:
//! - no top-level module of a crate reaches itself through others (`crate::` paths): shared
//!   types move down into a module both sides use instead;
//! - no source file over 700 lines; no function outside tests over 120 lines, except the few
//!   that ARCHITECTURE.md names with the reason they stay.
//!
//! The graph and the lengths are read from the source text, without a parser: `crate::name`
//! (and each name of `crate::{a, b::c}`) outside comments and tests is an edge; a function runs from its
//! `fn` line to the first line that closes it at the same indentation; a file's tests (from its
//! `#[cfg(test)]` module on) do not count towards function lengths.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use llorch_tests::repo_root;

const MAX_FILE_LINES: usize = 700;
const MAX_FN_LINES: usize = 120;

/// Functions allowed past [`MAX_FN_LINES`], as `crate/path.rs::name`; each is named in
/// docs/ARCHITECTURE.md ("Layout rules") with why it stays.
const LONG_FNS: &[&str] = &[];

fn crates() -> Vec<(String, PathBuf)> {
    let mut out: Vec<_> = std::fs::read_dir(repo_root().join("crates"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("src").is_dir())
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                p.join("src"),
            )
        })
        .collect();
    out.sort();
    assert!(out.len() >= 10, "the crates were not found: {out:?}");
    out
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's text before its tests, without `//` comments (doc links are not dependencies,
/// and a test may use any module).
fn code_of(text: &str) -> String {
    text.lines()
        .take_while(|l| !l.starts_with("#[cfg(test)]"))
        .map(|l| match l.find("//") {
            Some(i) if !l[..i].contains('"') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The module names a file's `crate::` paths start with.
fn crate_paths(code: &str) -> BTreeSet<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        // `crate::` inside a longer path (`my_crate::…`) is not this crate's.
        if code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // `crate::{a, b::c, d::{e, f}}`: the first name of each top-level item.
            let mut depth = 0;
            let mut item_start = 0;
            for (j, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => {
                        names.insert(ident(&group[item_start..j]));
                        break;
                    }
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        names.insert(ident(&group[item_start..j]));
                        item_start = j + 1;
                    }
                    _ => {}
                }
            }
        } else {
            names.insert(ident(rest));
        }
    }
    names.remove("");
    names
}

/// The top-level module a file belongs to; None for the crate roots and binaries.
fn top_module(src: &Path, file: &Path) -> Option<String> {
    let first = file.strip_prefix(src).ok()?.components().next()?;
    match first.as_os_str().to_str()? {
        "lib.rs" | "main.rs" | "bin" => None,
        f => Some(f.trim_end_matches(".rs").to_string()),
    }
}

fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeSet<String> = files.iter().filter_map(|f| top_module(src, f)).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let Some(from) = top_module(src, file) else {
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let edges = graph.entry(from.clone()).or_default();
        edges.extend(
            crate_paths(&code)
                .into_iter()
                .filter(|m| *m != from && modules.contains(m)),
        );
    }
    graph
}

/// A cycle in `graph`, as the modules along it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, graph, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut Vec::new(), &mut done))
}

/// Functions longer than [`MAX_FN_LINES`] before the file's tests, as (lines, name, line).
fn long_functions(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let end = lines
        .iter()
        .position(|l| l.starts_with("#[cfg(test)]"))
        .unwrap_or(lines.len());
    let mut long = Vec::new();
    for (i, line) in lines[..end].iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let Some(name) = [
            "pub fn ",
            "pub(crate) fn ",
            "pub(super) fn ",
            "fn ",
            "async fn ",
        ]
        .iter()
        .chain(&[
            "pub async fn ",
            "pub(crate) async fn ",
            "pub(super) async fn ",
        ])
        .find_map(|p| trimmed.strip_prefix(p))
        .map(|rest| {
            rest.chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        }) else {
            continue;
        };
        let close = format!("{indent}}}");
        if let Some(n) = lines[i + 1..end].iter().position(|l| *l == close) {
            if n + 2 > MAX_FN_LINES {
                long.push((n + 2, name, i + 1));
            }
        }
    }
    long
}

#[test]
fn no_module_reaches_itself_through_another() {
    for (name, src) in crates() {
        if let Some(cycle) = find_cycle(&module_graph(&src)) {
            panic!(
                "crate {name}: the modules {} import each other in a cycle; move what they share \
                 into a module below both",
                cycle.join(" → ")
            );
        }
    }
}

#[test]
fn files_and_functions_stay_short() {
    let mut faults = Vec::new();
    for (name, src) in crates() {
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            let rel = file
                .strip_prefix(repo_root())
                .unwrap()
                .display()
                .to_string();
            let n = text.lines().count();
            if n > MAX_FILE_LINES {
                faults.push(format!(
                    "{rel}: {n} lines (at most {MAX_FILE_LINES}): split it by job"
                ));
            }
            for (n, f, line) in long_functions(&text) {
                let short = format!("{name}/{}::{f}", file.strip_prefix(&src).unwrap().display());
                if !LONG_FNS.contains(&short.as_str()) {
                    faults.push(format!(
                        "{rel}:{line}: fn {f} is {n} lines (at most {MAX_FN_LINES}): name its steps"
                    ));
                }
            }
        }
    }
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}

/// The end-to-end scenarios read as a list of named steps: no function of the tests (their
/// support code included) runs past the same bound as the crates' code.
#[test]
fn scenario_tests_read_as_named_steps() {
    let mut dirs = vec![repo_root().join("tests"), repo_root().join("tests/support")];
    for (_, src) in crates() {
        dirs.push(src.parent().unwrap().join("tests"));
    }
    let mut faults = Vec::new();
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for file in entries.map(|e| e.unwrap().path()) {
            if file.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            let rel = file
                .strip_prefix(repo_root())
                .unwrap()
                .display()
                .to_string();
            for (n, f, line) in long_functions(&text) {
                faults.push(format!(
                    "{rel}:{line}: fn {f} is {n} lines (at most {MAX_FN_LINES}): name its steps"
                ));
            }
        }
    }
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}

#[test]
fn the_checks_see_what_they_look_for() {
    let paths = crate_paths("use crate::a::B;\nuse crate::{b, c::{D, E}, d};\nx = my_crate::e;");
    assert_eq!(paths, ["a", "b", "c", "d"].map(String::from).into());
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), ["b".to_string()].into()),
        ("b".to_string(), ["c".to_string()].into()),
        ("c".to_string(), ["a".to_string()].into()),
    ]
    .into();
    assert_eq!(find_cycle(&graph).unwrap(), ["a", "b", "c", "a"]);
    let body = "    x();\n".repeat(MAX_FN_LINES);
    let text =
        format!("fn long() {{\n{body}}}\n\nfn short() {{\n}}\n#[cfg(test)]\nfn t() {{\n{body}}}\n");
    let long = long_functions(&text);
    assert_eq!(long, [(MAX_FN_LINES + 2, "long".to_string(), 1)]);
}
