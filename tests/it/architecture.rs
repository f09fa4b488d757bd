//! ARCHITECTURE.md against the code, so that the map cannot go stale unnoticed: every name it
//! gives in backticks still exists, every module has its row, the layer diagram draws what the
//! modules import, no module imports what its row says it must not know, and no modules import
//! each other in a circle.
//!
//! The source is read as text, with comments, string literals and `#[cfg(test)]` modules blanked
//! out, so a name that survives only in a comment or a test does not count as existing.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The repository's root.
fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------------------------
// Reading Rust source

/// `text` with comments and the insides of string and char literals replaced by spaces (line
/// breaks kept), so that braces balance and words are code.
fn blank(text: &str) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let keep_lines = |c: char| if c == '\n' { '\n' } else { ' ' };
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                out.push(' ');
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    out.push_str("  ");
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    out.push_str("  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    out.push(keep_lines(chars[i]));
                    i += 1;
                }
            }
        } else if c == 'r'
            && (next == Some('"') || next == Some('#'))
            && !chars[..i].last().is_some_and(|p| is_word(*p))
        {
            // A raw string: r"…", r#"…"#.
            let hashes = chars[i + 1..].iter().take_while(|c| **c == '#').count();
            if chars.get(i + 1 + hashes) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: Vec<char> = std::iter::once('"')
                .chain(std::iter::repeat_n('#', hashes))
                .collect();
            out.push('"');
            i += 2 + hashes;
            while i < chars.len() && !chars[i..].starts_with(&close) {
                out.push(keep_lines(chars[i]));
                i += 1;
            }
            out.push('"');
            i += close.len();
        } else if c == '"' || c == '\'' && is_char_literal(&chars[i..]) {
            out.push(c);
            i += 1;
            while i < chars.len() && chars[i] != c {
                if chars[i] == '\\' {
                    out.push(' ');
                    i += 1;
                }
                if i < chars.len() {
                    out.push(keep_lines(chars[i]));
                    i += 1;
                }
            }
            out.push(c);
            i += 1;
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Whether the `'` at the start of `rest` opens a char literal (`'x'`, `'\n'`), not a lifetime.
fn is_char_literal(rest: &[char]) -> bool {
    match rest.get(1) {
        Some('\\') => true,
        Some(_) => rest.get(2) == Some(&'\''),
        None => false,
    }
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The position of the brace that closes the one at `open`.
fn closing(code: &str, open: usize) -> usize {
    let mut depth = 0;
    for (i, c) in code[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return open + i;
                }
            }
            _ => {}
        }
    }
    code.len()
}

/// `code` (already blanked) without its `#[cfg(test)] mod … { … }` blocks.
fn without_tests(code: &str) -> String {
    let mut out = code.to_owned();
    let mut from = 0;
    while let Some(at) = out[from..].find("#[cfg(test)]").map(|i| from + i) {
        let after = at + "#[cfg(test)]".len();
        let rest = out[after..].trim_start();
        let is_mod = rest.starts_with("mod ") || rest.starts_with("pub mod ");
        let open = out[after..].find(['{', ';']).map(|i| after + i);
        match open {
            Some(open) if is_mod && out.as_bytes()[open] == b'{' => {
                let close = closing(&out, open);
                let blanked: String = out[at..=close]
                    .chars()
                    .map(|c| if c == '\n' { '\n' } else { ' ' })
                    .collect();
                out.replace_range(at..=close, &blanked);
                from = close;
            }
            _ => from = after,
        }
    }
    out
}

/// A word or a `::` of blanked code, and where it starts.
#[derive(Debug, Clone, PartialEq)]
struct Token<'a> {
    text: &'a str,
    at: usize,
}

/// The words (identifiers, keywords, numbers) and single punctuation of `code`; `::` is one token.
fn tokens(code: &str) -> Vec<Token<'_>> {
    let mut out = Vec::new();
    let mut chars = code.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if is_word(c) {
            let mut end = at + c.len_utf8();
            while let Some(&(i, c)) = chars.peek() {
                if !is_word(c) {
                    break;
                }
                end = i + c.len_utf8();
                chars.next();
            }
            out.push(Token {
                text: &code[at..end],
                at,
            });
        } else if c == ':' && chars.peek().is_some_and(|(_, c)| *c == ':') {
            chars.next();
            out.push(Token { text: "::", at });
        } else if !c.is_whitespace() {
            out.push(Token {
                text: &code[at..at + c.len_utf8()],
                at,
            });
        }
    }
    out
}

/// One file of `src/`: a module of the library.
struct Module {
    /// `store::lanes` for src/store/lanes.rs.
    path: String,
    /// Blanked, without its test module.
    code: String,
    /// What it defines, as (kind, name).
    defined: BTreeSet<(String, String)>,
}

impl Module {
    /// The module and its descendants (`store` covers `store::lanes`).
    fn within(&self, ancestor: &str) -> bool {
        self.path == ancestor || self.path.starts_with(&format!("{ancestor}::"))
    }
}

fn top(path: &str) -> &str {
    path.split("::").next().unwrap_or(path)
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The library's modules, by path; `lib.rs` (the root, only `mod` lines) and `main.rs` (a crate
/// of its own) are not among them.
fn modules() -> BTreeMap<String, Module> {
    let src = root().join("src");
    let mut modules = BTreeMap::new();
    for file in rust_files(&src) {
        let relative = file.strip_prefix(&src).unwrap().with_extension("");
        let mut parts: Vec<String> = relative
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        if parts == ["lib"] || parts == ["main"] || parts[0] == "bin" {
            continue;
        }
        let path = parts.join("::");
        let code = without_tests(&blank(&read(&file)));
        let defined = definitions(&code);
        modules.insert(
            path.clone(),
            Module {
                path,
                code,
                defined,
            },
        );
    }
    modules
}

const DEFINING: [&str; 9] = [
    "struct", "enum", "trait", "type", "union", "fn", "const", "static", "mod",
];
const TYPES: [&str; 5] = ["struct", "enum", "trait", "type", "union"];

/// The items `code` defines, as (kind, name); `macro` for `macro_rules!`.
fn definitions(code: &str) -> BTreeSet<(String, String)> {
    let tokens = tokens(code);
    let mut defined = BTreeSet::new();
    for (i, pair) in tokens.windows(2).enumerate() {
        if DEFINING.contains(&pair[0].text) {
            defined.insert((pair[0].text.to_owned(), pair[1].text.to_owned()));
        } else if pair[0].text == "macro_rules"
            && pair[1].text == "!"
            && let Some(name) = tokens.get(i + 2)
        {
            defined.insert(("macro".to_owned(), name.text.to_owned()));
        }
    }
    defined
}

/// Whether `defined` has `name` as one of the `kinds` of item.
fn defines(defined: &BTreeSet<(String, String)>, name: &str, kinds: &[&str]) -> bool {
    kinds
        .iter()
        .any(|kind| defined.contains(&((*kind).to_owned(), name.to_owned())))
}

/// The bodies of the `impl` blocks whose self type is `ty`, of `trait ty` and of `enum ty`.
fn bodies_of<'a>(code: &'a str, ty: &str) -> Vec<(&'static str, &'a str)> {
    let tokens = tokens(code);
    let mut bodies = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let kind = match token.text {
            "impl" => "impl",
            "trait" if tokens.get(i + 1).is_some_and(|t| t.text == ty) => "trait",
            "enum" if tokens.get(i + 1).is_some_and(|t| t.text == ty) => "enum",
            _ => continue,
        };
        // An `impl` item, not `impl Trait` in a signature: it starts an item.
        let before = code[..token.at].trim_end();
        if kind == "impl"
            && !(before.is_empty()
                || before.ends_with(['}', ';', ']', '{'])
                || before.ends_with("unsafe"))
        {
            continue;
        }
        let Some(open) = code[token.at..].find('{').map(|o| token.at + o) else {
            continue;
        };
        if kind == "impl" && impl_self_type(&code[token.at + 4..open]) != ty {
            continue;
        }
        bodies.push((kind, &code[open + 1..closing(code, open)]));
    }
    bodies
}

/// The name of the type an impl header (`<T> Trait for Type<T> where …`) is for.
fn impl_self_type(header: &str) -> &str {
    let mut header = header.trim_start();
    if header.starts_with('<') {
        let mut depth = 0;
        for (i, c) in header.char_indices() {
            depth += match c {
                '<' => 1,
                '>' => -1,
                _ => 0,
            };
            if depth == 0 {
                header = &header[i + 1..];
                break;
            }
        }
    }
    let header = header.split(" where ").next().unwrap_or(header);
    let self_type = header.rsplit_once(" for ").map_or(header, |(_, t)| t);
    let self_type = self_type
        .trim()
        .split(['<', ' ', '\n'])
        .next()
        .unwrap_or("");
    self_type.rsplit("::").next().unwrap_or(self_type)
}

/// Whether `ty` has `member`: a method or associated item in one of its impls or its trait, or a
/// variant of it as an enum.
fn has_member(modules: &BTreeMap<String, Module>, ty: &str, member: &str) -> bool {
    modules.values().any(|module| {
        bodies_of(&module.code, ty).iter().any(|(kind, body)| {
            defines(&definitions(body), member, &["fn", "const", "type"])
                || *kind == "enum" && enum_variants(body).contains(&member)
        })
    })
}

/// The variant names of an enum's body.
fn enum_variants(body: &str) -> Vec<&str> {
    let tokens = tokens(body);
    let mut depth = 0;
    let mut variants = Vec::new();
    let mut expect_name = true;
    let mut in_attribute = 0;
    for token in &tokens {
        match token.text {
            "(" | "{" | "[" => {
                depth += 1;
                if token.text == "[" && depth == 1 {
                    in_attribute = 1;
                }
            }
            ")" | "}" | "]" => {
                depth -= 1;
                if depth == 0 {
                    in_attribute = 0;
                }
            }
            "," if depth == 0 => expect_name = true,
            text if depth == 0 && in_attribute == 0 && expect_name && text != "#" => {
                variants.push(text);
                expect_name = false;
            }
            _ => {}
        }
    }
    variants
}

// ---------------------------------------------------------------------------------------------
// Reading ARCHITECTURE.md

fn architecture() -> String {
    read(&root().join("ARCHITECTURE.md"))
}

/// The document without its fenced blocks, and the fenced blocks.
fn prose_and_fences(doc: &str) -> (String, Vec<String>) {
    let (mut prose, mut fences, mut fence) = (String::new(), Vec::new(), None::<String>);
    for line in doc.lines() {
        match (&mut fence, line.trim_start().starts_with("```")) {
            (None, true) => fence = Some(String::new()),
            (Some(_), true) => fences.extend(fence.take()),
            (Some(block), false) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, false) => {
                prose.push_str(line);
                prose.push('\n');
            }
        }
    }
    (prose, fences)
}

/// Every backticked span of `text`.
fn spans(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// `a/{b,c}` as `a/b`, `a/c`.
fn expand_braces(span: &str) -> Vec<String> {
    match (span.find('{'), span.find('}')) {
        (Some(open), Some(close)) if open < close => span[open + 1..close]
            .split(',')
            .map(|part| format!("{}{}{}", &span[..open], part.trim(), &span[close + 1..]))
            .collect(),
        _ => vec![span.to_owned()],
    }
}

/// The rows of the table under `## {heading}`, as cells.
fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let start = doc
        .find(&format!("## {heading}\n"))
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no section '## {heading}'"));
    doc[start..]
        .lines()
        .skip(1)
        .skip_while(|line| !line.starts_with('|'))
        .take_while(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            line.trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().to_owned())
                .collect()
        })
        .collect()
}

/// The crates `Cargo.toml` names, as code spells them, and the standard library's.
fn crates() -> BTreeSet<String> {
    let manifest = read(&root().join("Cargo.toml"));
    let mut names: BTreeSet<String> = ["std", "core", "alloc"].map(str::to_owned).into();
    let mut in_dependencies = false;
    for line in manifest.lines() {
        if line.starts_with('[') {
            in_dependencies = line.contains("dependencies");
        } else if in_dependencies && let Some((name, _)) = line.split_once('=') {
            let name = name.trim();
            if !name.is_empty() && !name.starts_with('#') {
                names.insert(name.replace('-', "_"));
            }
        }
    }
    names
}

// ---------------------------------------------------------------------------------------------
// The names in the document

/// Where a backticked name is looked up: the library, and everything a name in the invariants
/// table may point to (test names, the bench, migrations' columns, dependencies).
struct Names {
    modules: BTreeMap<String, Module>,
    /// What all of src/, tests/ and bench/ define, test modules included: test names.
    everything: BTreeSet<(String, String)>,
    /// src/ as written: environment variables are string literals.
    raw_src: String,
    /// The migrations: column names.
    sql: String,
    crates: BTreeSet<String>,
}

impl Names {
    fn load() -> Self {
        let mut everything = String::new();
        let mut raw_src = String::new();
        for dir in ["src", "tests", "bench"] {
            for file in rust_files(&root().join(dir)) {
                let text = read(&file);
                everything.push_str(&blank(&text));
                everything.push('\n');
                if dir == "src" {
                    raw_src.push_str(&text);
                }
            }
        }
        let mut sql = String::new();
        for entry in std::fs::read_dir(root().join("migrations")).unwrap() {
            sql.push_str(&read(&entry.unwrap().path()));
        }
        Self {
            modules: modules(),
            everything: definitions(&everything),
            raw_src,
            sql,
            crates: crates(),
        }
    }

    /// Whether any module in or under `scope` (all of them for `""`) defines `name` as one of
    /// `kinds`.
    fn defined(&self, scope: &str, name: &str, kinds: &[&str]) -> bool {
        self.modules
            .values()
            .filter(|m| scope.is_empty() || m.within(scope))
            .any(|m| defines(&m.defined, name, kinds))
    }

    /// The module a path's first segment names: a top-level module, or the one module whose
    /// last segment it is (`sql` for `store::sql`).
    fn module_named(&self, first: &str) -> Result<String, String> {
        if self.modules.contains_key(first) {
            return Ok(first.to_owned());
        }
        let found: Vec<&String> = self
            .modules
            .keys()
            .filter(|path| path.rsplit("::").next() == Some(first))
            .collect();
        match found[..] {
            [one] => Ok(one.clone()),
            [] => Err(format!("no module (nor crate) named `{first}`")),
            _ => Err(format!("`{first}` is ambiguous: {found:?}")),
        }
    }

    /// Checks a `::` path: `module::…::Name`, `Type::member`, `module::Type::member`.
    fn check_path(&self, span: &str) -> Result<(), String> {
        // `Watch::Waiting(Subscription)`, `settings()`: the path is before the parenthesis.
        let path = span.split('(').next().unwrap_or(span);
        let mut segments: Vec<&str> = path.split("::").collect();
        if segments
            .iter()
            .any(|s| s.is_empty() || !s.chars().all(is_word))
        {
            return Err("is not a Rust path".into());
        }
        if segments[0] == "crate" {
            segments.remove(0);
        } else if self.crates.contains(segments[0]) && !self.modules.contains_key(segments[0]) {
            // Another crate's item: Cargo.toml has the crate; the compiler checks the rest.
            return Ok(());
        }
        let mut module = String::new();
        if segments[0].starts_with(char::is_lowercase) {
            module = self.module_named(segments[0])?;
            segments.remove(0);
            while let Some(next) = segments.first() {
                let child = format!("{module}::{next}");
                if !self.modules.contains_key(&child) {
                    break;
                }
                module = child;
                segments.remove(0);
            }
        }
        let scope = if module.is_empty() {
            "src/".to_owned()
        } else {
            format!("`{module}`")
        };
        match segments[..] {
            [] => Ok(()),
            [name] if self.defined(&module, name, &DEFINING) || self.macro_defined(name) => Ok(()),
            [name] => Err(format!("nothing named `{name}` is defined in {scope}")),
            [ty, member] => {
                if !self.defined(&module, ty, &TYPES) {
                    Err(format!("no type `{ty}` is defined in {scope}"))
                } else if !has_member(&self.modules, ty, member) {
                    Err(format!(
                        "`{ty}` has no method, associated item or variant `{member}`"
                    ))
                } else {
                    Ok(())
                }
            }
            _ => Err(format!(
                "cannot resolve `{}` in {scope}",
                segments.join("::")
            )),
        }
    }

    fn macro_defined(&self, name: &str) -> bool {
        self.defined("", name, &["macro"])
    }

    /// Checks one backticked span; `None` when it is not a name this test can check (SQL, a
    /// command line, a URL, a word of prose).
    fn check(&self, span: &str) -> Option<Result<(), String>> {
        let span = span.trim();
        let words_only = |s: &str| s.chars().all(is_word);
        let first = span.chars().next()?;
        if span.contains(char::is_whitespace) || "#$-/.0123456789".contains(first) {
            return None;
        }
        if let Some(name) = span.strip_suffix('!') {
            return Some(
                words_only(name)
                    .then_some(())
                    .filter(|()| self.macro_defined(name))
                    .ok_or_else(|| format!("no macro_rules! `{name}` in src/")),
            );
        }
        if span.contains("::") {
            return Some(self.check_path(span));
        }
        if span.contains('/') || span.ends_with(".rs") {
            return Some(self.check_file_or_module(span));
        }
        if let Some(name) = span.strip_suffix("()") {
            return Some(
                (words_only(name) && self.defined("", name, &["fn"]))
                    .then_some(())
                    .ok_or_else(|| format!("no fn `{name}` in src/")),
            );
        }
        if !words_only(span) {
            return None;
        }
        if span
            .chars()
            .all(|c| c.is_uppercase() || c.is_numeric() || c == '_')
        {
            if !span.contains('_') {
                // An SQL keyword (`UPDATE`), not a name.
                return None;
            }
            if span.starts_with("HANDOFF_") || span.ends_with("_URL") {
                let literal = format!("\"{span}\"");
                return Some(
                    self.raw_src
                        .contains(&literal)
                        .then_some(())
                        .ok_or_else(|| format!("src/ never reads the variable {literal}")),
                );
            }
            return Some(self.check_path(span));
        }
        if first.is_uppercase() {
            return Some(
                self.defined("", span, &TYPES)
                    .then_some(())
                    .ok_or_else(|| format!("no type `{span}` is defined in src/")),
            );
        }
        if span.contains('_') {
            // A function (a test's name too), a column, or a crate.
            let known = defines(&self.everything, span, &DEFINING)
                || tokens(&self.sql).iter().any(|t| t.text == span)
                || self.crates.contains(span);
            return Some(known.then_some(()).ok_or_else(|| {
                format!("no fn, module or const `{span}` in src/, tests/ or bench/, no such column, no such crate")
            }));
        }
        None
    }

    /// `store/batch`, `routes/{api,pages}` (modules), `main.rs`, `tests/it/core.rs`, `bench/`.
    fn check_file_or_module(&self, span: &str) -> Result<(), String> {
        for span in expand_braces(span) {
            let path = span.trim_end_matches('/');
            let as_file = if span.contains('/') {
                root().join(path)
            } else {
                root().join("src").join(path)
            };
            if path.contains('.') || as_file.is_dir() {
                if !as_file.exists() {
                    return Err(format!("{} does not exist", as_file.display()));
                }
                continue;
            }
            let module = path.replace('/', "::");
            if !self.modules.contains_key(&module) {
                return Err(format!("no module `{module}` in src/"));
            }
        }
        Ok(())
    }
}

#[test]
fn every_name_architecture_md_gives_exists_in_the_code() {
    let names = Names::load();
    let (prose, _) = prose_and_fences(&architecture());
    let mut stale = String::new();
    let mut checked = 0;
    for span in spans(&prose) {
        match names.check(span) {
            Some(Ok(())) => checked += 1,
            Some(Err(why)) => writeln!(stale, "  `{span}`: {why}").unwrap(),
            None => {}
        }
    }
    assert!(
        stale.is_empty(),
        "ARCHITECTURE.md names what the code no longer has; fix the document (or the code):\n{stale}"
    );
    // The document names well over a hundred things; far fewer means the parsing broke.
    assert!(checked > 100, "only {checked} names were checked");
}

#[test]
fn every_module_has_its_row_in_the_code_map() {
    let names = Names::load();
    let rows = table(&architecture(), "Code map");
    let mut rowed = BTreeSet::new();
    let mut problems = String::new();
    for row in &rows {
        for span in spans(&row[0]) {
            for span in expand_braces(span) {
                if span == "main.rs" {
                    continue;
                }
                let module = span.replace('/', "::");
                if names.modules.contains_key(&module) {
                    rowed.insert(module);
                } else {
                    writeln!(problems, "  a row for `{span}`, which is no module in src/").unwrap();
                }
            }
        }
    }
    for path in names.modules.keys() {
        if rowed.contains(path) {
            continue;
        }
        // A small child may be named in its parent's row instead (`limits`: `throttle`, …).
        let named_by_parent = path.rsplit_once("::").is_some_and(|(parent, last)| {
            rows.iter().any(|row| {
                spans(&row[0])
                    .iter()
                    .any(|s| s.replace('/', "::") == parent)
                    && row.iter().any(|cell| spans(cell).contains(&last))
            })
        });
        if !named_by_parent {
            writeln!(
                problems,
                "  module `{path}` has no row (nor is it named in its parent's row)"
            )
            .unwrap();
        }
    }
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md's code map and src/ disagree:\n{problems}"
    );
}

// ---------------------------------------------------------------------------------------------
// Imports between modules

/// Which modules each module names, with an example of each: `crate::…` and `super::…` paths
/// (`use` trees expanded) and `child::…` paths to its own children, resolved to the longest
/// module they start with.
fn imports(modules: &BTreeMap<String, Module>) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut edges = BTreeMap::new();
    for module in modules.values() {
        let mut to: BTreeMap<String, String> = BTreeMap::new();
        for path in paths(&module.code) {
            let Some(target) = resolve(modules, &module.path, &path) else {
                continue;
            };
            if target != module.path {
                to.entry(target).or_insert_with(|| path.join("::"));
            }
        }
        edges.insert(module.path.clone(), to);
    }
    edges
}

/// Every path in `code` that starts with `crate`, `super` or a plain name, with `use` trees
/// (`use super::{a, b::{c, self}}`) expanded into one path per leaf.
fn paths(code: &str) -> Vec<Vec<String>> {
    let tokens = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i].text == "use" {
            let end = tokens[i..]
                .iter()
                .position(|t| t.text == ";")
                .map_or(tokens.len(), |e| i + e);
            expand_use(&tokens[i + 1..end], &[], &mut out);
            i = end;
            continue;
        }
        let starts = is_word(tokens[i].text.chars().next().unwrap_or(' '))
            && tokens.get(i + 1).is_some_and(|t| t.text == "::")
            && (i == 0 || tokens[i - 1].text != "::");
        if starts {
            let mut path = vec![tokens[i].text.to_owned()];
            let mut j = i + 1;
            while tokens.get(j).is_some_and(|t| t.text == "::")
                && tokens
                    .get(j + 1)
                    .is_some_and(|t| t.text.chars().all(is_word))
            {
                path.push(tokens[j + 1].text.to_owned());
                j += 2;
            }
            out.push(path);
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

/// Expands a `use` tree (the tokens after `use`, before `;`) under `prefix` into `out`.
fn expand_use(tree: &[Token<'_>], prefix: &[String], out: &mut Vec<Vec<String>>) {
    let mut path = prefix.to_vec();
    let mut i = 0;
    while i < tree.len() {
        match tree[i].text {
            "::" => {}
            "{" => {
                let close = matching(tree, i);
                for item in split_top(&tree[i + 1..close]) {
                    expand_use(item, &path, out);
                }
                return;
            }
            "as" => break,
            "self" => {}
            "*" => break,
            word => path.push(word.to_owned()),
        }
        i += 1;
    }
    out.push(path);
}

/// The index of the `}` closing the `{` at `open`.
fn matching(tree: &[Token<'_>], open: usize) -> usize {
    let mut depth = 0;
    for (i, t) in tree.iter().enumerate().skip(open) {
        match t.text {
            "{" => depth += 1,
            "}" => {
                depth -= 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => {}
        }
    }
    tree.len()
}

/// A use tree's items, split at its top-level commas.
fn split_top<'t, 'a>(items: &'t [Token<'a>]) -> Vec<&'t [Token<'a>]> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, t) in items.iter().enumerate() {
        match t.text {
            "{" => depth += 1,
            "}" => depth -= 1,
            "," if depth == 0 => {
                out.push(&items[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&items[start..]);
    out.into_iter().filter(|item| !item.is_empty()).collect()
}

/// The module `path` names from inside `me`, if it names one of the crate's modules.
fn resolve(modules: &BTreeMap<String, Module>, me: &str, path: &[String]) -> Option<String> {
    let mut base: Vec<&str> = me.split("::").collect();
    let rest: Vec<&str> = match path.first()?.as_str() {
        "crate" => {
            base.clear();
            path[1..].iter().map(String::as_str).collect()
        }
        "super" => {
            let supers = path.iter().take_while(|s| *s == "super").count();
            base.truncate(base.len().saturating_sub(supers));
            path[supers..].iter().map(String::as_str).collect()
        }
        // A child's name, as in `deadlines::track` in startup.
        first if modules.contains_key(&format!("{me}::{first}")) => {
            path.iter().map(String::as_str).collect()
        }
        _ => return None,
    };
    let full: Vec<&str> = base.into_iter().chain(rest).collect();
    (1..=full.len())
        .rev()
        .map(|k| full[..k].join("::"))
        .find(|candidate| modules.contains_key(candidate))
}

/// The groups of modules that reach each other through their imports (Tarjan), largest first.
fn circles(edges: &BTreeMap<String, BTreeMap<String, String>>) -> Vec<Vec<String>> {
    struct Walk<'e> {
        edges: &'e BTreeMap<String, BTreeMap<String, String>>,
        index: BTreeMap<&'e str, usize>,
        low: BTreeMap<&'e str, usize>,
        stack: Vec<&'e str>,
        on_stack: BTreeSet<&'e str>,
        found: Vec<Vec<String>>,
    }
    impl<'e> Walk<'e> {
        fn visit(&mut self, v: &'e str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.edges.get(v).into_iter().flat_map(|to| to.keys()) {
                if !self.index.contains_key(w.as_str()) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w.as_str()]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w.as_str()) {
                    let low = self.low[v].min(self.index[w.as_str()]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut group = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    group.push(w.to_owned());
                    if w == v {
                        break;
                    }
                }
                if group.len() > 1 {
                    group.sort();
                    self.found.push(group);
                }
            }
        }
    }
    let mut walk = Walk {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in edges.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn no_modules_import_each_other_in_a_circle() {
    let modules = modules();
    let edges = imports(&modules);
    // A module and its own children may use each other: `mod a;` and `super::` from inside it.
    let bad: Vec<Vec<String>> = circles(&edges)
        .into_iter()
        .filter(|group| group.iter().any(|m| top(m) != top(&group[0])))
        .collect();
    let mut report = String::new();
    for (n, group) in bad.iter().enumerate() {
        writeln!(report, "circle {}: {}", n + 1, group.join(", ")).unwrap();
        for a in group {
            for (b, via) in &edges[a] {
                if group.contains(b) {
                    writeln!(report, "  {a} -> {b}   (e.g. {via})").unwrap();
                }
            }
        }
    }
    assert!(
        bad.is_empty(),
        "modules import each other in a circle:\n{report}"
    );
    assert!(
        edges.values().map(BTreeMap::len).sum::<usize>() > 50,
        "too few imports found; the parsing broke: {edges:?}"
    );
}

/// The imports between top-level modules, `main` (the binary, which names the library as
/// `handoff::`) included, with an example of each.
fn top_level_imports() -> BTreeMap<String, BTreeMap<String, String>> {
    let modules = modules();
    let mut top_edges: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for (from, to) in imports(&modules) {
        for (target, via) in to {
            if top(&from) != top(&target) {
                top_edges
                    .entry(top(&from).to_owned())
                    .or_default()
                    .entry(top(&target).to_owned())
                    .or_insert(format!("{from}: {via}"));
            }
        }
    }
    let main = without_tests(&blank(&read(&root().join("src/main.rs"))));
    for path in paths(&main) {
        if path[0] == "handoff"
            && let Some(target) = path.get(1).filter(|t| modules.contains_key(*t))
        {
            top_edges
                .entry("main".into())
                .or_default()
                .entry(target.clone())
                .or_insert(format!("main: {}", path.join("::")));
        }
    }
    top_edges
}

/// The edges the layer diagram draws. A line is lists of modules joined by arrows: `a ─▶ b, c
/// ─▶ d` is a→b, a→c, b→d, c→d. An arrow that starts with `├` or `└` comes from the module
/// written above that corner. Text in parentheses is a remark.
fn diagram_edges(diagram: &str) -> BTreeSet<(String, String)> {
    let lines: Vec<Vec<char>> = diagram.lines().map(|l| l.chars().collect()).collect();
    let word_at = |row: usize, col: usize| -> Option<String> {
        let line = &lines[row];
        if !line.get(col).is_some_and(|c| is_word(*c)) {
            return None;
        }
        let start = (0..=col).rev().take_while(|i| is_word(line[*i])).last()?;
        let end = (col..line.len()).take_while(|i| is_word(line[*i])).last()?;
        Some(line[start..=end].iter().collect())
    };
    let above = |row: usize, col: usize| -> String {
        (0..row)
            .rev()
            .find_map(|r| word_at(r, col))
            .unwrap_or_else(|| panic!("the corner at line {row}, column {col} is under no module"))
    };
    let mut edges = BTreeSet::new();
    for (row, line) in lines.iter().enumerate() {
        let (mut sources, mut current): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
        let mut col = 0;
        while col < line.len() {
            let c = line[col];
            if c == '(' {
                col += line[col..]
                    .iter()
                    .position(|c| *c == ')')
                    .unwrap_or(line.len());
            } else if c == '├' || c == '└' || c == '─' {
                let arrow_end = col + line[col..].iter().position(|c| *c == '▶').unwrap_or(0);
                sources = if c == '─' {
                    std::mem::take(&mut current)
                } else {
                    vec![above(row, col)]
                };
                current.clear();
                col = arrow_end;
            } else if is_word(c) {
                let word = word_at(row, col).unwrap();
                col += word.chars().count() - 1;
                for source in &sources {
                    edges.insert((source.clone(), word.clone()));
                }
                current.push(word);
            }
            col += 1;
        }
    }
    edges
}

/// Whether `to` can be reached from `from` along `edges`.
fn reaches(edges: &BTreeSet<(String, String)>, from: &str, to: &str) -> bool {
    let mut seen = BTreeSet::from([from.to_owned()]);
    let mut todo = vec![from.to_owned()];
    while let Some(m) = todo.pop() {
        for (a, b) in edges {
            if *a == m && seen.insert(b.clone()) {
                if b == to {
                    return true;
                }
                todo.push(b.clone());
            }
        }
    }
    false
}

#[test]
fn the_layer_diagram_draws_what_the_modules_import() {
    let doc = architecture();
    let (_, fences) = prose_and_fences(&doc);
    let diagram = fences
        .iter()
        .find(|block| block.contains('▶'))
        .expect("ARCHITECTURE.md has a layer diagram (a fenced block with arrows)");
    let drawn = diagram_edges(diagram);
    let actual = top_level_imports();
    let mut problems = String::new();
    let mut tops: BTreeSet<String> = modules().keys().map(|m| top(m).to_owned()).collect();
    tops.insert("main".into());
    let in_diagram: BTreeSet<&String> = drawn.iter().flat_map(|(a, b)| [a, b]).collect();
    for module in &tops {
        if !in_diagram.contains(module) {
            writeln!(problems, "  `{module}` is not in the diagram").unwrap();
        }
    }
    for (a, b) in &drawn {
        if !tops.contains(a) || !tops.contains(b) {
            writeln!(problems, "  {a} ─▶ {b}: no such module").unwrap();
        } else if !actual.get(a).is_some_and(|to| to.contains_key(b)) {
            writeln!(
                problems,
                "  {a} ─▶ {b} is drawn, but {a} does not import {b}"
            )
            .unwrap();
        }
    }
    // Each layer knows only those below it: whatever it imports is drawn below it.
    for (a, to) in &actual {
        for (b, via) in to {
            if !reaches(&drawn, a, b) {
                writeln!(
                    problems,
                    "  {a} imports {b} ({via}), but {b} is not below {a}"
                )
                .unwrap();
            }
        }
    }
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md's layer diagram and the imports disagree:\n{problems}"
    );
}

/// What a phrase in the code map's "must not know" column forbids a module to name: crates
/// (by the name code uses) or the crate's own top-level modules. `everything` forbids every
/// module of the crate but the row's own.
const MUST_NOT_KNOW: [(&str, &[&str]); 8] = [
    (
        "HTTP",
        &["actix_web", "actix_http", "actix_web_lab", "actix_service"],
    ),
    ("SQL", &["sqlx"]),
    ("Redis", &["redis"]),
    ("the hub", &["hub"]),
    ("the store", &["store"]),
    ("routes", &["routes"]),
    ("jobs", &["jobs"]),
    ("everything", &["*"]),
];

/// The claims of the code map's "must not know" column this test can check: for each row's
/// module(s), the names its code must not contain. The cell is read up to its first `;` or `:`
/// (what follows explains); words in parentheses are remarks, backticked names in them are
/// claims too.
fn must_not_know(names: &Names) -> BTreeMap<String, BTreeSet<String>> {
    let tops: BTreeSet<&str> = names.modules.keys().map(|m| top(m)).collect();
    let mut claims: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in table(&architecture(), "Code map") {
        let cell = row.last().unwrap();
        let claim = cell.split([';', ':']).next().unwrap_or("");
        let mut words = String::new();
        let mut depth = 0;
        for c in claim.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                c if depth == 0 => words.push(c),
                _ => {}
            }
        }
        let words: Vec<&str> = words
            .split([',', '`'])
            .map(|w| w.trim().trim_start_matches("anything").trim())
            .collect();
        let mut forbidden = BTreeSet::new();
        for (phrase, names) in MUST_NOT_KNOW {
            if words.iter().any(|w| *w == phrase || w.starts_with(phrase)) {
                forbidden.extend(names.iter().map(|n| (*n).to_owned()));
            }
        }
        if forbidden.remove("*") {
            forbidden.extend(tops.iter().map(|t| (*t).to_owned()));
        }
        forbidden.extend(
            spans(claim)
                .into_iter()
                .filter(|s| s.starts_with(char::is_uppercase))
                .map(str::to_owned),
        );
        for span in spans(&row[0]) {
            for module in expand_braces(span) {
                let module = module.replace('/', "::");
                let mut own = forbidden.clone();
                own.remove(top(&module));
                if names.modules.contains_key(&module) && !own.is_empty() {
                    claims.entry(module).or_default().extend(own);
                }
            }
        }
    }
    claims
}

#[test]
fn no_module_names_what_its_row_says_it_must_not_know() {
    let names = Names::load();
    let claims = must_not_know(&names);
    // The claims the layers rest on: if rewording the code map made them unreadable here, this
    // test would check nothing.
    for (module, name) in [
        ("jobs", "actix_web"),
        ("jobs", "AppError"),
        ("delivery", "actix_web"),
        ("store", "actix_web"),
        ("sessions", "actix_web"),
        ("startup::deadlines", "routes"),
        ("domain", "store"),
    ] {
        assert!(
            claims.get(module).is_some_and(|c| c.contains(name)),
            "the code map's row for `{module}` no longer reads as \"must not know {name}\": {claims:?}"
        );
    }
    let edges = imports(&names.modules);
    // The crate's own modules are forbidden through imports; a variable may share their name.
    let tops: BTreeSet<&str> = names.modules.keys().map(|m| top(m)).collect();
    let mut problems = String::new();
    for (row, forbidden) in &claims {
        for module in names.modules.values().filter(|m| m.within(row)) {
            for name in forbidden {
                let imported = edges[&module.path]
                    .iter()
                    .find(|(target, _)| top(target) == name);
                // A crate is named by a path that starts with it; a type by its name.
                let named = if name.starts_with(char::is_lowercase) {
                    paths(&module.code).iter().any(|path| path[0] == *name)
                } else {
                    tokens(&module.code).iter().any(|t| t.text == name)
                };
                if let Some((_, via)) = imported {
                    writeln!(problems, "  `{}` uses `{name}` ({via})", module.path).unwrap();
                } else if named && !tops.contains(name.as_str()) {
                    writeln!(problems, "  `{}` names `{name}`", module.path).unwrap();
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "modules know what their row in ARCHITECTURE.md's code map says they must not:\n{problems}"
    );
}
