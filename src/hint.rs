//! Hints: an extra line after an error that says what to do next.

use std::fmt;

/// Wraps an error so that it carries a hint and keeps its own message as the headline.
#[derive(Debug)]
pub struct Hinted {
    pub error: anyhow::Error,
    pub hint: String,
}

impl fmt::Display for Hinted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.error, f)
    }
}

impl std::error::Error for Hinted {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

pub trait HintExt<T> {
    /// Adds `hint: ...` to the error this result may carry.
    fn hint(self, hint: impl Into<String>) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> HintExt<T> for Result<T, E> {
    fn hint(self, hint: impl Into<String>) -> anyhow::Result<T> {
        self.map_err(|e| {
            anyhow::Error::new(Hinted {
                error: e.into(),
                hint: hint.into(),
            })
        })
    }
}

/// Renders an error as `error: ...`, one `caused by:` line per cause, then any hints.
pub fn render(err: &anyhow::Error) -> String {
    let mut out = String::new();
    let mut hints = Vec::new();
    let mut first = true;
    for cause in err.chain() {
        if let Some(h) = cause.downcast_ref::<Hinted>() {
            hints.push(h.hint.clone());
            // Its Display is the wrapped error's message, printed as this link of the chain.
        }
        let msg = cause.to_string();
        if first {
            out.push_str(&format!("error: {msg}\n"));
            first = false;
        } else if !out.contains(&msg) {
            out.push_str(&format!("  caused by: {msg}\n"));
        }
    }
    for h in hints {
        out.push_str(&format!("hint: {h}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn hint_is_printed_after_causes() {
        let r: anyhow::Result<()> = Err(anyhow::anyhow!("file is truncated"))
            .hint("re-export the model")
            .context("cannot load model.onnx");
        let text = render(&r.unwrap_err());
        assert_eq!(
            text,
            "error: cannot load model.onnx\n  caused by: file is truncated\nhint: re-export the model\n"
        );
    }
}
