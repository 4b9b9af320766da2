//! Every command the README and docs/ show is real: each invocation of one of our binaries (in a shell
//! block or an inline code span) names a subcommand and flags that the binary's own `--help` lists, and
//! each `recipes/` or `scripts/` path and `make` target it names exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use idavlm_tests::{bin, root};

const BINARIES: [&str; 6] = ["idavlm-launch", "idavlm-worker", "idavlm-shards", "idavlm-infer", "idavlm-eval", "idavlm-export"];
/// Binaries whose first word is a subcommand.
const WITH_SUBCOMMANDS: [&str; 2] = ["idavlm-shards", "idavlm-worker"];

/// The README and the guide's pages (docs/bench holds raw outputs of past runs, not instructions).
fn pages() -> Vec<PathBuf> {
    let mut out = vec![root().join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "md"))
        .collect();
    docs.sort();
    out.extend(docs);
    out
}

/// The command lines of a page: shell blocks (continuations joined, comments dropped) and inline
/// code spans that start with one of our binaries or `make`.
fn commands(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut in_block = false;
    let mut pending: Option<(usize, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        if t.starts_with("```") {
            in_block = !in_block && (t == "```sh" || t == "```bash" || t == "```");
            continue;
        }
        if in_block {
            let code = t.split(" #").next().unwrap_or("").trim_end();
            if code.starts_with('#') || code.is_empty() {
                continue;
            }
            let (no, mut acc) = pending.take().unwrap_or((i + 1, String::new()));
            acc.push_str(code.trim_end_matches('\\'));
            acc.push(' ');
            if code.ends_with('\\') {
                pending = Some((no, acc));
            } else {
                out.push((no, acc));
            }
            continue;
        }
        for (k, span) in line.split('`').enumerate() {
            if k % 2 == 1 && (BINARIES.iter().any(|b| span.starts_with(&format!("{b} "))) || span.starts_with("make ")) {
                out.push((i + 1, span.to_string()));
            }
        }
    }
    out
}

/// The help text of `bin [sub]`, cached.
fn help(cache: &mut BTreeMap<Vec<String>, Option<String>>, args: &[String]) -> Option<String> {
    cache
        .entry(args.to_vec())
        .or_insert_with(|| {
            let o = Command::new(bin(&args[0])).args(&args[1..]).arg("--help").output().expect("run --help");
            o.status.success().then(|| String::from_utf8_lossy(&o.stdout).into_owned())
        })
        .clone()
}

fn flag_listed(help: &str, flag: &str) -> bool {
    help.match_indices(flag).any(|(at, _)| {
        let after = help[at + flag.len()..].chars().next();
        let before = help[..at].chars().last();
        !after.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') && !before.is_some_and(|c| c == '-')
    })
}

fn make_targets() -> BTreeSet<String> {
    let mk = std::fs::read_to_string(root().join("Makefile")).expect("Makefile");
    mk.lines()
        .filter(|l| !l.starts_with('\t') && !l.starts_with('.') && !l.starts_with('#'))
        .filter_map(|l| l.split_once(':').filter(|(_, r)| !r.starts_with('=')).map(|(t, _)| t.trim().to_string()))
        .filter(|t| !t.contains(' ') && !t.is_empty())
        .collect()
}

#[test]
fn every_documented_command_is_real() {
    let mut cache = BTreeMap::new();
    let targets = make_targets();
    let mut bad = Vec::new();
    let mut checked = 0;
    for page in pages() {
        let text = std::fs::read_to_string(&page).expect("page");
        let name = page.strip_prefix(root()).unwrap_or(&page).display().to_string();
        for (line, cmd) in commands(&text) {
            let words: Vec<&str> = cmd.split_whitespace().collect();
            for (at, w) in words.iter().enumerate() {
                if (w.starts_with("recipes/") || w.starts_with("scripts/")) && !w.contains('*') && !w.contains('<') {
                    let p = w.trim_end_matches([',', ')', ';', '`']);
                    if !Path::new(&root().join(p)).exists() {
                        bad.push(format!("{name}:{line}: {p} does not exist ({cmd})"));
                    }
                }
                if *w == "make" && at == 0 {
                    if let Some(t) = words.get(1).filter(|t| !t.starts_with('-')) {
                        if !targets.contains(*t) {
                            bad.push(format!("{name}:{line}: make has no target {t} ({cmd})"));
                        }
                    }
                }
            }
            // Each of our binaries on the line, with the words up to the next command separator.
            for (at, w) in words.iter().enumerate() {
                let b = w.rsplit('/').next().unwrap_or(w);
                if !BINARIES.contains(&b) {
                    continue;
                }
                if b == "idavlm-export" {
                    bad.push(format!("{name}:{line}: there is no idavlm-export binary ({cmd})"));
                    continue;
                }
                let rest: Vec<&str> =
                    words[at + 1..].iter().take_while(|x| !matches!(**x, "|" | "&&" | ";" | "||" | ">" | "2>&1")).copied().collect();
                let mut args = vec![b.to_string()];
                if WITH_SUBCOMMANDS.contains(&b) {
                    match rest.iter().find(|x| !x.starts_with('-')) {
                        Some(sub) if sub.chars().all(|c| c.is_ascii_lowercase() || c == '-') => args.push(sub.to_string()),
                        _ => {}
                    }
                }
                checked += 1;
                let Some(h) = help(&mut cache, &args) else {
                    bad.push(format!("{name}:{line}: `{} --help` fails: unknown subcommand? ({cmd})", args.join(" ")));
                    continue;
                };
                for f in rest.iter().filter(|x| x.starts_with("--") && x.len() > 2) {
                    let flag = f.split('=').next().unwrap_or(f).trim_end_matches([',', '`', ')', ']']);
                    if flag.len() > 2 && !flag_listed(&h, flag) {
                        bad.push(format!("{name}:{line}: `{}` has no flag {flag} ({cmd})", args.join(" ")));
                    }
                }
            }
        }
    }
    assert!(checked >= 20, "only {checked} documented commands found: is the scan broken?");
    assert!(bad.is_empty(), "documented commands that do not exist as written:\n  {}", bad.join("\n  "));
}
