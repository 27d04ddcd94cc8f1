//! Dependencies point one way: each top-level module of `src/` may use
//! only modules of lower layers (the layer map of `src/lib.rs`). Read from
//! the source: every `crate::<module>` path outside comments, including
//! the members of `use crate::{…}` groups.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Lowest first; a module may use only modules of an earlier entry.
const LAYERS: &[&[&str]] = &[
    &["domain", "wall_clock"],
    &["telemetry"],
    &["stages"],
    &["config"],
    &["gateway"],
    &["pipeline"],
    &["sinks"],
    &["http"],
    &["app"],
    &["sim"],
    &["bench"],
    &["cli"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
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

/// The top-level module a file of `src/` belongs to (`None` for the crate root files).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main")).then(|| name.to_owned())
}

/// The code of a file without its line comments (doc comments included).
fn code_of(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            // A `//` inside a string is rare in this code base and would
            // only hide a path, never invent one.
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules `code` names through `crate::`.
fn uses(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // Members of the group at depth 1: the text after `{` or a `,`.
            let mut depth = 1;
            let mut start = true;
            for (j, c) in group.char_indices() {
                if start && !c.is_whitespace() {
                    let name = ident(&group[j..]);
                    if !name.is_empty() {
                        found.insert(name);
                    }
                    start = false;
                }
                match c {
                    '{' => depth += 1,
                    '}' if depth == 1 => break,
                    '}' => depth -= 1,
                    ',' if depth == 1 => start = true,
                    _ => {}
                }
            }
        } else {
            let name = ident(rest);
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// No module of `src/` uses a module of its own or a higher layer.
#[test]
fn modules_use_only_lower_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else {
            continue;
        };
        let Some(layer) = layer_of(&module) else {
            wrong.push(format!("{module} is in no layer of this test"));
            continue;
        };
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        for used in uses(&code) {
            if used == module {
                continue;
            }
            match layer_of(&used) {
                Some(l) if l < layer => {}
                _ => wrong.push(format!(
                    "{} uses crate::{used}",
                    file.strip_prefix(&src).unwrap().display()
                )),
            }
        }
    }
    wrong.sort();
    wrong.dedup();
    assert!(
        wrong.is_empty(),
        "upward or sideways uses:\n{}",
        wrong.join("\n")
    );
}

/// The parser sees plain paths, grouped uses and nested groups, and not comments.
#[test]
fn parser_finds_paths_and_groups() {
    let code = code_of(
        "use crate::a::b;\nuse crate::{c::D, e::{f, g}, h};\nlet x = crate::i::j();\n// crate::k\n/// crate::l\n",
    );
    let found: Vec<String> = uses(&code).into_iter().collect();
    assert_eq!(found, ["a", "c", "e", "h", "i"]);
}
