//! The crates' layering, read from the sources: the data crate has no libtorch, the model imports
//! neither the communicators nor ZeRO, and the trainer's modules import each other without cycles.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace").to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let p = e.expect("entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// Top-level module of the trainer library -> the top-level modules it names through `crate::`.
fn trainer_imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = root().join("trainer/src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(&src).expect("under src");
        let first = rel.components().next().expect("component").as_os_str().to_string_lossy().to_string();
        if first == "bin" || first == "lib.rs" {
            continue; // binaries and the crate root sit above every module
        }
        let module = first.trim_end_matches(".rs").to_string();
        // Code only: doc links and comments are not imports.
        let text: String = std::fs::read_to_string(&f)
            .expect("read")
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        let deps = g.entry(module.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..].chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() && name != module {
                deps.insert(name);
            }
        }
    }
    g
}

#[test]
fn the_model_imports_neither_comm_nor_zero() {
    let g = trainer_imports();
    let model = &g["model"];
    for forbidden in ["comm", "zero", "train", "step", "checkpoint"] {
        assert!(!model.contains(forbidden), "model imports crate::{forbidden}: {model:?}");
    }
}

#[test]
fn the_trainer_modules_have_no_import_cycles() {
    let g = trainer_imports();
    // Depth-first search with colours; a grey node reached again closes a cycle.
    fn visit<'a>(
        n: &'a str,
        g: &'a BTreeMap<String, BTreeSet<String>>,
        colour: &mut BTreeMap<&'a str, u8>,
        path: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match colour.get(n) {
            Some(2) => return None,
            Some(1) => {
                let at = path.iter().position(|p| *p == n).expect("on the path");
                return Some(path[at..].iter().map(|s| s.to_string()).chain([n.to_string()]).collect());
            }
            _ => {}
        }
        colour.insert(n, 1);
        path.push(n);
        for d in g.get(n).into_iter().flatten() {
            if let Some(c) = visit(d, g, colour, path) {
                return Some(c);
            }
        }
        path.pop();
        colour.insert(n, 2);
        None
    }
    let mut colour = BTreeMap::new();
    for n in g.keys() {
        if let Some(c) = visit(n, &g, &mut colour, &mut Vec::new()) {
            panic!("import cycle: {}", c.join(" -> "));
        }
    }
}

#[test]
fn the_data_crate_has_no_libtorch() {
    let toml = std::fs::read_to_string(root().join("shards/Cargo.toml")).expect("shards/Cargo.toml");
    assert!(!toml.lines().any(|l| l.trim_start().starts_with("tch")), "shards depends on tch");
    let mut files = Vec::new();
    rust_files(&root().join("shards/src"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).expect("read");
        let uses_tch = text
            .match_indices("tch::")
            .any(|(i, _)| !text[..i].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_'));
        assert!(!uses_tch, "{} uses tch", f.display());
    }
}
