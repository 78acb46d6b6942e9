//! Recipe text and positions: every recipe error names the file, line and column of the
//! field it is about, or the `--set` flag that put the value there.
//!
//! Positions come from the YAML parser itself rather than from a hand-written scanner:
//! [`Source::locate`] replays the document through `serde_norway` with a visitor that walks
//! down a field path and raises a marker error at the node it is after; the parser stamps
//! that error with the node's position. This stays right for flow mappings, anchors,
//! aliases and multi-line values, which a line scanner would get wrong, and it uses the same
//! parser that read the values, so the two never disagree about the document.
//!
//! Recipes write references bare even inside flow collections (`[${a.out}, x]`), where
//! YAML would read the braces as a nested mapping. No YAML crate accepts that, so the text
//! is rewritten before parsing to quote those references ([`quote_flow_references`]), and
//! the added quotes are subtracted again from every reported column.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

/// One step of a field path: a mapping key or a list index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// Where a value sits in the recipe, e.g. `stages.quantize.calibration.samples` or
/// `stages.bench.models[2]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(pub Vec<Seg>);

impl FieldPath {
    pub fn root() -> Self {
        FieldPath(Vec::new())
    }

    pub fn key(&self, key: impl Into<String>) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Key(key.into()));
        p
    }

    pub fn index(&self, i: usize) -> Self {
        let mut p = self.clone();
        p.0.push(Seg::Index(i));
        p
    }

    pub fn starts_with(&self, prefix: &FieldPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Parses `a.b[2].c` (the form `--set` uses and [`fmt::Display`] writes).
    pub fn parse(text: &str) -> Option<FieldPath> {
        let mut segs = Vec::new();
        for part in text.split('.') {
            let (name, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            if name.is_empty() {
                return None;
            }
            segs.push(Seg::Key(name.to_string()));
            while !rest.is_empty() {
                let close = rest.find(']')?;
                let idx: usize = rest.get(1..close)?.parse().ok()?;
                segs.push(Seg::Index(idx));
                rest = &rest[close + 1..];
                if !rest.is_empty() && !rest.starts_with('[') {
                    return None;
                }
            }
        }
        Some(FieldPath(segs))
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for seg in &self.0 {
            match seg {
                Seg::Key(k) => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(k)?;
                }
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
            first = false;
        }
        Ok(())
    }
}

/// Where a recipe value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A 1-based line and column in the recipe file.
    File { line: usize, column: usize },
    /// A `--set` flag, as typed.
    Flag(String),
    /// The file as a whole (an empty file, a read error).
    Whole,
}

/// A place in a recipe: the file and where in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub origin: Origin,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Origin::File { line, column } => {
                write!(f, "{}:{line}:{column}", self.file.display())
            }
            Origin::Flag(flag) => write!(f, "{}: --set {flag}", self.file.display()),
            Origin::Whole => write!(f, "{}", self.file.display()),
        }
    }
}

/// A recipe that cannot be used as written. Displays as
/// `recipe.yaml:12:5: stages.quantize.calibration: unknown key ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeError {
    pub location: Location,
    /// The field path; empty for errors about the document as a whole.
    pub field: String,
    pub message: String,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}: {}", self.location, self.message)
        } else {
            write!(f, "{}: {}: {}", self.location, self.field, self.message)
        }
    }
}

impl std::error::Error for RecipeError {}

/// Which part of a `key: value` entry an error points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// The key, e.g. for an unknown key or a missing required key below it.
    Key,
    /// The value; for a mapping or list value this falls back to its key, whose line is
    /// the one a reader looks for.
    Value,
}

/// A value put in place by `--set`, for blaming errors on the flag rather than the file.
#[derive(Debug, Clone)]
pub(crate) struct Override {
    /// The flag as typed, `quantize.calibration.method=percentile`.
    pub text: String,
    /// The full path it set.
    pub path: FieldPath,
    /// The outermost mapping the override had to create, if the file lacked it.
    pub created: Option<FieldPath>,
}

/// The recipe text as parsed, plus what is needed to map positions back to the file.
#[derive(Debug, Clone)]
pub struct Source {
    /// The recipe path as the user gave it.
    pub(crate) file: PathBuf,
    /// The text handed to the YAML parser (see [`quote_flow_references`]).
    pub(crate) text: String,
    /// Per line, the columns (0-based, in the parsed text) of quotes added by the rewrite.
    inserted: Vec<Vec<usize>>,
    pub(crate) overrides: Vec<Override>,
}

impl Source {
    pub fn new(file: &Path, original: &str) -> Source {
        let (text, inserted) = quote_flow_references(original);
        Source {
            file: file.to_path_buf(),
            text,
            inserted,
            overrides: Vec::new(),
        }
    }

    /// Maps a 1-based position in the parsed text to the same position in the file.
    fn to_original(&self, line: usize, column: usize) -> (usize, usize) {
        let Some(cols) = line.checked_sub(1).and_then(|l| self.inserted.get(l)) else {
            return (line, column);
        };
        let c0 = column.saturating_sub(1);
        let shift = cols.iter().filter(|&&c| c < c0).count();
        (line, column - shift)
    }

    /// Rewrites every `line N column M` in a parser message to positions in the file.
    pub(crate) fn fix_message_positions(&self, msg: &str) -> String {
        let mut out = String::new();
        let mut rest = msg;
        while let Some(i) = rest.find("line ") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 5..];
            let parsed = (|| {
                let ld = after.find(|c: char| !c.is_ascii_digit())?;
                let line: usize = after[..ld].parse().ok()?;
                let tail = after[ld..].strip_prefix(" column ")?;
                let cd = tail
                    .find(|c: char| !c.is_ascii_digit())
                    .unwrap_or(tail.len());
                let col: usize = tail[..cd].parse().ok()?;
                Some((line, col, &tail[cd..]))
            })();
            match parsed {
                Some((line, col, tail)) => {
                    let (l, c) = self.to_original(line, col);
                    out.push_str(&format!("line {l} column {c}"));
                    rest = tail;
                }
                None => {
                    out.push_str("line ");
                    rest = after;
                }
            }
        }
        out.push_str(rest);
        out
    }

    pub(crate) fn at_file(&self, line: usize, column: usize) -> Location {
        let (line, column) = self.to_original(line, column);
        Location {
            file: self.file.clone(),
            origin: Origin::File { line, column },
        }
    }

    pub(crate) fn whole(&self) -> Location {
        Location {
            file: self.file.clone(),
            origin: Origin::Whole,
        }
    }

    /// Where the field at `path` sits: a `--set` flag if one put it there, else its
    /// position in the file, else (for a field the file does not have) its nearest
    /// ancestor that it does have.
    pub fn locate(&self, path: &FieldPath, target: Target) -> Location {
        for o in self.overrides.iter().rev() {
            let by_flag = path.starts_with(&o.path)
                || o.created.as_ref().is_some_and(|c| path.starts_with(c));
            if by_flag {
                return Location {
                    file: self.file.clone(),
                    origin: Origin::Flag(o.text.clone()),
                };
            }
        }
        let mut p = path.clone();
        let mut target = target;
        loop {
            if let Some((line, column)) = find_position(&self.text, &p.0, target) {
                return self.at_file(line, column);
            }
            if p.0.pop().is_none() {
                return self.whole();
            }
            target = Target::Key;
        }
    }

    pub(crate) fn error(
        &self,
        path: &FieldPath,
        target: Target,
        message: impl Into<String>,
    ) -> RecipeError {
        RecipeError {
            location: self.locate(path, target),
            field: path.to_string(),
            message: message.into(),
        }
    }
}

/// Quotes `${...}` references that sit in flow collections (`[...]`, `{...}`), where YAML
/// would otherwise read their braces as a nested mapping: `[${a.out}, x]` becomes
/// `['${a.out}', x]`. Returns the new text and, per line, the columns of the added quotes.
///
/// References in block context (`key: ${a.out}`) are already plain scalars and are left
/// alone. Only the structure needed to tell the two apart is tracked: comments, quoted
/// scalars, block scalars, flow depth and where a new token may start.
pub(crate) fn quote_flow_references(text: &str) -> (String, Vec<Vec<usize>>) {
    let chars: Vec<char> = text.chars().collect();
    let n = chars.len();
    let mut out = String::with_capacity(text.len() + 16);
    let mut inserted: Vec<Vec<usize>> = vec![Vec::new()];
    let mut col = 0usize;
    let blank = |i: usize| i >= n || matches!(chars[i], ' ' | '\t' | '\r' | '\n');

    // Appends one character and keeps the output line/column current.
    macro_rules! push {
        ($c:expr) => {{
            let c: char = $c;
            out.push(c);
            if c == '\n' {
                inserted.push(Vec::new());
                col = 0;
            } else {
                col += 1;
            }
        }};
    }
    macro_rules! insert_quote {
        () => {{
            if let Some(line) = inserted.last_mut() {
                line.push(col);
            }
            push!('\'');
        }};
    }

    let mut i = 0;
    let mut flow = 0usize;
    let mut token_start = true;
    let mut line_start = true;
    let mut line_indent = 0usize;
    let mut block_scalar_parent: Option<usize> = None;

    while i < n {
        if line_start {
            line_start = false;
            let indent = chars[i..].iter().take_while(|&&c| c == ' ').count();
            let line_end = chars[i..]
                .iter()
                .position(|&c| c == '\n')
                .map_or(n, |p| i + p);
            let is_blank = chars[i..line_end].iter().all(|c| c.is_whitespace());
            if let Some(parent) = block_scalar_parent {
                if is_blank || indent > parent {
                    // Literal text of a `|` or `>` scalar: copied as is.
                    while i < line_end {
                        push!(chars[i]);
                        i += 1;
                    }
                    if i < n {
                        push!('\n');
                        i += 1;
                        line_start = true;
                    }
                    continue;
                }
                block_scalar_parent = None;
            }
            line_indent = indent;
            if flow == 0 {
                token_start = true;
            }
        }
        let c = chars[i];
        let prev_blank = i == 0 || matches!(chars[i - 1], ' ' | '\t' | '\n');
        match c {
            '\n' => {
                push!('\n');
                i += 1;
                line_start = true;
            }
            ' ' | '\t' | '\r' => {
                push!(c);
                i += 1;
            }
            '#' if prev_blank => {
                while i < n && chars[i] != '\n' {
                    push!(chars[i]);
                    i += 1;
                }
            }
            '\'' | '"' if token_start => {
                push!(c);
                i += 1;
                while i < n {
                    let d = chars[i];
                    if c == '"' && d == '\\' && i + 1 < n {
                        push!(d);
                        push!(chars[i + 1]);
                        i += 2;
                        continue;
                    }
                    if d == c {
                        if c == '\'' && i + 1 < n && chars[i + 1] == '\'' {
                            push!(d);
                            push!(d);
                            i += 2;
                            continue;
                        }
                        push!(d);
                        i += 1;
                        break;
                    }
                    push!(d);
                    i += 1;
                }
                token_start = false;
            }
            '[' | '{' if token_start => {
                flow += 1;
                push!(c);
                i += 1;
            }
            ']' | '}' if flow > 0 => {
                flow -= 1;
                push!(c);
                i += 1;
                token_start = false;
            }
            ',' if flow > 0 => {
                push!(c);
                i += 1;
                token_start = true;
            }
            '-' | '?' if token_start && flow == 0 && blank(i + 1) => {
                push!(c);
                i += 1;
            }
            ':' if flow > 0 || blank(i + 1) => {
                push!(c);
                i += 1;
                token_start = true;
            }
            '|' | '>' if token_start && flow == 0 => {
                block_scalar_parent = Some(line_indent);
                while i < n && chars[i] != '\n' {
                    push!(chars[i]);
                    i += 1;
                }
                token_start = false;
            }
            '&' | '!' if token_start => {
                while i < n && !blank(i) {
                    push!(chars[i]);
                    i += 1;
                }
            }
            _ if token_start => {
                // A plain scalar: find where it ends, treating `${...}` as one unit.
                let begin = i;
                let mut j = i;
                let mut has_ref = false;
                while j < n && chars[j] != '\n' {
                    let d = chars[j];
                    if d == '$' && j + 1 < n && chars[j + 1] == '{' {
                        let close = chars[j + 2..]
                            .iter()
                            .take_while(|&&x| x != '\n')
                            .position(|&x| x == '}');
                        if let Some(p) = close {
                            has_ref = true;
                            j = j + 2 + p + 1;
                            continue;
                        }
                    }
                    let next_ends = blank(j + 1)
                        || (flow > 0 && matches!(chars[j + 1], ',' | '[' | ']' | '{' | '}'));
                    if d == ':' && next_ends {
                        break;
                    }
                    if d == '#' && j > begin && matches!(chars[j - 1], ' ' | '\t') {
                        break;
                    }
                    if flow > 0 && matches!(d, ',' | '[' | ']' | '{' | '}') {
                        break;
                    }
                    j += 1;
                }
                let mut end = j;
                while end > begin && matches!(chars[end - 1], ' ' | '\t' | '\r') {
                    end -= 1;
                }
                let quote = flow > 0 && has_ref && !chars[begin..end].contains(&'\'');
                if quote {
                    insert_quote!();
                }
                for &d in &chars[begin..end] {
                    push!(d);
                }
                if quote {
                    insert_quote!();
                }
                i = end;
                token_start = false;
            }
            _ => {
                push!(c);
                i += 1;
            }
        }
    }
    (out, inserted)
}

/// The marker error raised at the node being looked for.
const HERE: &str = "\u{1}shrink-locate\u{1}";
/// Raised instead when the node is a mapping or list: its key is the better place.
const HERE_COLLECTION: &str = "\u{1}shrink-locate-collection\u{1}";

/// The 1-based (line, column), in `text`, of the key or value at `path`.
fn find_position(text: &str, path: &[Seg], target: Target) -> Option<(usize, usize)> {
    let run = |path: &[Seg], target: Target| {
        let de = serde_norway::Deserializer::from_str(text);
        match (Find { path, target }).deserialize(de) {
            Ok(()) => None,
            Err(e) => {
                let msg = e.to_string();
                let kind = if msg.contains(HERE_COLLECTION) {
                    HERE_COLLECTION
                } else if msg.contains(HERE) {
                    HERE
                } else {
                    return None;
                };
                e.location().map(|l| (kind, l.line(), l.column()))
            }
        }
    };
    let (kind, line, column) = run(path, target)?;
    if kind == HERE_COLLECTION && matches!(path.last(), Some(Seg::Key(_))) {
        if let Some((_, l, c)) = run(path, Target::Key) {
            return Some((l, c));
        }
    }
    Some((line, column))
}

/// Walks down `path`, skipping everything else, and fails with [`HERE`] at the node.
struct Find<'a> {
    path: &'a [Seg],
    target: Target,
}

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl Find<'_> {
    fn scalar<E: de::Error>(&self) -> Result<(), E> {
        if self.path.is_empty() {
            Err(E::custom(HERE))
        } else {
            Ok(())
        }
    }
}

impl<'de> Visitor<'de> for Find<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.scalar()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.scalar()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.scalar()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        self.scalar()
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag x`): look through the tag.
        let (_, v): (IgnoredAny, _) = data.variant()?;
        de::VariantAccess::newtype_variant_seed(v, self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(HERE_COLLECTION));
        };
        let Seg::Key(want) = first else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        let at_key = rest.is_empty() && self.target == Target::Key;
        while let Some(found) = map.next_key_seed(KeyIs {
            want,
            raise: at_key,
        })? {
            if found {
                map.next_value_seed(Find {
                    path: rest,
                    target: self.target,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            return Err(de::Error::custom(HERE_COLLECTION));
        };
        let Seg::Index(want) = *first else {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(());
        };
        for _ in 0..want {
            if seq.next_element::<IgnoredAny>()?.is_none() {
                return Ok(());
            }
        }
        seq.next_element_seed(Find {
            path: rest,
            target: self.target,
        })?;
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }
}

/// Reads a mapping key and says whether it is `want`; raises [`HERE`] on it if asked.
struct KeyIs<'a> {
    want: &'a str,
    raise: bool,
}

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        match (v == self.want, self.raise) {
            (true, true) => Err(E::custom(HERE)),
            (found, _) => Ok(found),
        }
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
        self.visit_str(&v.to_string())
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_unit<E: de::Error>(self) -> Result<bool, E> {
        Ok(false)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(false)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> FieldPath {
        FieldPath::parse(s).unwrap()
    }

    fn pos(src: &Source, path: &str, target: Target) -> (usize, usize) {
        match src.locate(&p(path), target).origin {
            Origin::File { line, column } => (line, column),
            other => panic!("{path}: {other:?}"),
        }
    }

    #[test]
    fn field_paths_round_trip() {
        for s in ["a", "a.b", "stages.bench.models[2]", "a[0][1].b"] {
            assert_eq!(p(s).to_string(), s);
        }
        assert!(FieldPath::parse("a..b").is_none());
        assert!(FieldPath::parse("a[x]").is_none());
        assert!(FieldPath::parse("a[1]b").is_none());
    }

    #[test]
    fn references_in_flow_collections_are_quoted() {
        let (t, ins) = quote_flow_references("a: { data: ${d.x}, m: auto }\n");
        assert_eq!(t, "a: { data: '${d.x}', m: auto }\n");
        assert_eq!(ins[0], vec![11, 18]);
        let (t, _) = quote_flow_references("m: [${a.b}, n=${c.out} ,x]\n");
        assert_eq!(t, "m: ['${a.b}', 'n=${c.out}' ,x]\n");
        let (t, _) = quote_flow_references("m: [\n  ${a.b},\n  {k: ${c}}]\n");
        assert_eq!(t, "m: [\n  '${a.b}',\n  {k: '${c}'}]\n");
    }

    #[test]
    fn block_context_comments_and_quotes_are_left_alone() {
        for text in [
            "a: ${x.y}\nb: [1, 2]\n",
            "a: \"{ ${x} }\" # [${y}]\n",
            "a: '[${x}'\nb: x\n",
            "a: |\n  [${x}]\n  {${y}}\nb: 1\n",
            "- ${x}\n- k: ${y}\n",
            "a: {b: '${x}'}\n",
        ] {
            let (t, _) = quote_flow_references(text);
            assert_eq!(t, text);
        }
    }

    #[test]
    fn quoted_text_parses_to_the_reference_strings() {
        let (t, _) = quote_flow_references(
            "c: { data: ${datasets.train}, n: 3 }\nm: [${a.out}, ${b.report}]\n",
        );
        let v: serde_norway::Value = serde_norway::from_str(&t).unwrap();
        assert_eq!(v["c"]["data"].as_str(), Some("${datasets.train}"));
        assert_eq!(v["m"][1].as_str(), Some("${b.report}"));
    }

    #[test]
    fn locates_keys_and_values_in_block_and_flow_style() {
        let text = "name: q\nstages:\n  quantize:\n    model: x\n    calibration: { data: ${d.t}, samples: abc }\n  bench:\n    models: [${a.b}, ${c.d}]\n";
        let src = Source::new(Path::new("r.yaml"), text);
        assert_eq!(pos(&src, "stages.quantize.model", Target::Key), (4, 5));
        assert_eq!(pos(&src, "stages.quantize.model", Target::Value), (4, 12));
        // Columns are those of the file, not of the quoted text.
        assert_eq!(
            pos(&src, "stages.quantize.calibration.samples", Target::Value),
            (5, 43)
        );
        assert_eq!(
            pos(&src, "stages.quantize.calibration.data", Target::Value),
            (5, 26)
        );
        assert_eq!(pos(&src, "stages.bench.models[1]", Target::Value), (7, 22));
        // A mapping value points at its key.
        assert_eq!(pos(&src, "stages.quantize", Target::Value), (3, 3));
        // A field the file lacks points at the nearest ancestor it has.
        assert_eq!(
            pos(&src, "stages.quantize.calibration.method", Target::Value),
            (5, 5)
        );
    }

    #[test]
    fn overrides_are_blamed_on_the_flag() {
        let mut src = Source::new(Path::new("r.yaml"), "stages:\n  distill:\n    epochs: 2\n");
        src.overrides.push(Override {
            text: "distill.epochs=x".into(),
            path: p("stages.distill.epochs"),
            created: None,
        });
        let loc = src.locate(&p("stages.distill.epochs"), Target::Value);
        assert_eq!(loc.origin, Origin::Flag("distill.epochs=x".into()));
        assert_eq!(loc.to_string(), "r.yaml: --set distill.epochs=x");
        let loc = src.locate(&p("stages.distill"), Target::Key);
        assert_eq!(loc.origin, Origin::File { line: 2, column: 3 });
    }

    #[test]
    fn parser_message_positions_are_mapped_back() {
        let src = Source::new(Path::new("r.yaml"), "a: [${x}, ${y}]\n");
        assert_eq!(
            src.fix_message_positions("bad at line 1 column 14, while parsing at line 1 column 4"),
            "bad at line 1 column 11, while parsing at line 1 column 4"
        );
    }
}
