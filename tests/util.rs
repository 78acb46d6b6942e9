//! Helpers for CLI tests: a fresh temporary folder per test and a runner for the real binary.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What one run of the binary produced.
#[derive(Debug)]
pub struct Output {
    pub stdout: String,
    pub stderr: String,
    /// Exit code; -1 when the process was killed by a signal.
    pub code: i32,
}

/// A temporary folder, removed when dropped, in which commands run.
pub struct Dir {
    tmp: tempfile::TempDir,
}

impl Default for Dir {
    fn default() -> Self {
        Dir::new()
    }
}

impl Dir {
    pub fn new() -> Dir {
        Dir {
            tmp: tempfile::Builder::new()
                .prefix("shrink-test-")
                .tempdir()
                .expect("create a temporary folder"),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, contents).expect("write a test file");
        p
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).expect("read a test file")
    }

    /// Runs `shrink ARGS...` in this folder with CI variables cleared.
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_env(args, &[])
    }

    /// Like [`Dir::run`], with extra environment variables.
    pub fn run_env(&self, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shrink"));
        cmd.args(args)
            .current_dir(self.root())
            // A test run inside GitHub Actions must not annotate or write the real summary.
            .env_remove("GITHUB_ACTIONS")
            .env_remove("GITHUB_STEP_SUMMARY")
            .env("NO_COLOR", "1");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run the shrink binary");
        Output {
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            code: out.status.code().unwrap_or(-1),
        }
    }
}

/// Checks that `xml` is well-formed enough for CI tools: one XML declaration, properly nested
/// and closed elements, quoted attributes, and only the five predefined or numeric entity
/// references. Returns the element names in document order.
pub fn check_xml(xml: &str) -> Result<Vec<String>, String> {
    let body = xml
        .strip_prefix("<?xml version=\"1.0\" encoding=\"UTF-8\"?>")
        .ok_or("no XML declaration")?;
    let mut stack: Vec<String> = Vec::new();
    let mut names = Vec::new();
    let mut rest = body;
    let mut roots = 0;
    while let Some(lt) = rest.find('<') {
        check_text(&rest[..lt])?;
        if stack.is_empty() && !rest[..lt].trim().is_empty() {
            return Err(format!("text outside the root element: {:?}", &rest[..lt]));
        }
        let gt = rest[lt..].find('>').ok_or("unclosed tag")? + lt;
        let tag = &rest[lt + 1..gt];
        rest = &rest[gt + 1..];
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack.pop().ok_or_else(|| format!("stray </{name}>"))?;
            if open != name.trim() {
                return Err(format!("<{open}> closed by </{name}>"));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let tag = tag.trim_end_matches('/');
        let name = tag
            .split_whitespace()
            .next()
            .ok_or("empty tag")?
            .to_string();
        check_attributes(&tag[name.len()..])?;
        if stack.is_empty() {
            roots += 1;
        }
        names.push(name.clone());
        if !self_closing {
            stack.push(name);
        }
    }
    check_text(rest)?;
    if !rest.trim().is_empty() {
        return Err("text after the root element".into());
    }
    if let Some(open) = stack.pop() {
        return Err(format!("<{open}> is never closed"));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(names)
}

fn check_text(text: &str) -> Result<(), String> {
    if text.contains("]]>") {
        return Err("`]]>` in text".into());
    }
    let mut rest = text;
    while let Some(amp) = rest.find('&') {
        let semi = rest[amp..].find(';').ok_or("`&` without `;`")? + amp;
        let entity = &rest[amp + 1..semi];
        let ok = matches!(entity, "amp" | "lt" | "gt" | "quot" | "apos")
            || entity
                .strip_prefix('#')
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
        if !ok {
            return Err(format!("bad entity &{entity};"));
        }
        rest = &rest[semi + 1..];
    }
    if text
        .chars()
        .any(|c| (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t'))
    {
        return Err("control character in text".into());
    }
    Ok(())
}

fn check_attributes(mut attrs: &str) -> Result<(), String> {
    loop {
        attrs = attrs.trim_start();
        if attrs.is_empty() {
            return Ok(());
        }
        let eq = attrs
            .find('=')
            .ok_or_else(|| format!("attribute without value: {attrs}"))?;
        let name = &attrs[..eq];
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(format!("bad attribute name {name:?}"));
        }
        let value = attrs[eq + 1..]
            .strip_prefix('"')
            .ok_or_else(|| format!("unquoted attribute {name}"))?;
        let end = value
            .find('"')
            .ok_or_else(|| format!("unterminated attribute {name}"))?;
        let v = &value[..end];
        if v.contains('<') {
            return Err(format!("`<` in attribute {name}"));
        }
        check_text(v)?;
        attrs = &value[end + 1..];
    }
}

#[test]
fn check_xml_rejects_broken_documents() {
    let decl = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n";
    let ok = format!("{decl}<a x=\"1 &amp; 2\"><b/><c>t &lt; u</c></a>\n");
    assert_eq!(check_xml(&ok).unwrap(), ["a", "b", "c"]);
    for bad in [
        "<a><b></a></b>",
        "<a x=1></a>",
        "<a>&nbsp;</a>",
        "<a>x & y</a>",
        "<a></a><b></b>",
        "<a>",
        "<a x=\"<\"></a>",
        "<a>\u{1}</a>",
    ] {
        assert!(check_xml(&format!("{decl}{bad}")).is_err(), "{bad}");
    }
    assert!(check_xml("<a></a>").is_err(), "no declaration");
}
