//! The documentation's links: every relative link in README.md, the pages
//! under docs/ and the other Markdown files of the repository leads to a
//! file of the repository, and every `#anchor` to a heading of its page,
//! so a reader never lands on nothing and no page cites a file outside the
//! repository. Links to the web are not followed (the test runs offline).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The Markdown files checked: README.md, BENCHMARKS.md, docs/ and docker/.
fn pages(root: &Path) -> Vec<PathBuf> {
    let mut pages = vec![root.join("README.md"), root.join("BENCHMARKS.md")];
    for dir in ["docs", "docker"] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "md"))
            .collect();
        found.sort();
        pages.extend(found);
    }
    pages
}

/// The targets of the inline links `[text](target)` of `text`, outside
/// fenced code blocks and inline code.
fn links(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if fenced {
            continue;
        }
        let line = strip_inline_code(line);
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].trim().to_owned());
            rest = &after[end..];
        }
    }
    out
}

/// `line` without its `inline code` spans (which may hold `](`).
fn strip_inline_code(line: &str) -> String {
    line.split('`')
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(_, part)| part)
        .collect()
}

/// GitHub's anchor of a heading: lower case, punctuation dropped, spaces
/// to hyphens.
fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// The anchors of the headings of a Markdown page.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut fenced = false;
    let mut out = BTreeSet::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        } else if !fenced && line.starts_with('#') {
            out.insert(slug(line.trim_start_matches('#')));
        }
    }
    out
}

/// Every relative link and anchor of the documentation resolves inside the repository.
#[test]
fn relative_links_and_anchors_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .canonicalize()
        .unwrap();
    let mut broken = Vec::new();
    let mut checked = 0;
    for page in pages(&root) {
        let text = std::fs::read_to_string(&page).unwrap();
        let name = page.strip_prefix(&root).unwrap().display().to_string();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            checked += 1;
            let (file, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            let Ok(target) = target.canonicalize() else {
                broken.push(format!("{name}: {link}: no such file"));
                continue;
            };
            if !target.starts_with(&root) {
                broken.push(format!("{name}: {link}: outside the repository"));
                continue;
            }
            if anchor.is_empty() {
                continue;
            }
            let headings = anchors(&std::fs::read_to_string(&target).unwrap_or_default());
            if !headings.contains(anchor) {
                broken.push(format!("{name}: {link}: no heading with that anchor"));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} links found: is the parser broken?"
    );
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

/// The parser finds links outside code, and anchors the way GitHub makes them.
#[test]
fn parser_finds_links_and_anchors() {
    let text = "See [a](docs/a.md#x-y) and `[no](code)`.\n```\n[no](fence)\n```\n[b](#top)";
    assert_eq!(links(text), ["docs/a.md#x-y", "#top"]);
    assert_eq!(
        slug(" A page: what it covers (v2)"),
        "a-page-what-it-covers-v2"
    );
    let headings = anchors("# Top\n```\n# not\n```\n## X y");
    assert_eq!(
        headings,
        BTreeSet::from(["top".to_owned(), "x-y".to_owned()])
    );
}
