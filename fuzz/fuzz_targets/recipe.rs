//! The recipe parser: YAML text (up to the first NUL byte), then `--set` overrides (one per
//! NUL-separated chunk; `only=STAGE` and `from=STAGE` chunks select stages), parsed and
//! validated against a folder holding the files recipes usually name (and a symbolic link
//! that leads out of the output folder), then planned and the plan rendered.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shrink::recipe::{Recipe, Selection};

fn recipe_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = shrink_fuzz::scratch("recipe");
        let outside = shrink_fuzz::scratch("outside");
        std::fs::create_dir_all(dir.join("out")).unwrap();
        std::fs::create_dir_all(dir.join("images/0")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        for f in ["m.onnx", "teacher.onnx", "student.onnx", "d.npz", "val.npz", "baseline.json"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        #[cfg(unix)]
        std::os::unix::fs::symlink(&outside, dir.join("out/escape")).unwrap();
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    shrink_fuzz::init();
    let mut parts = data.split(|&b| b == 0);
    let text = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let mut overrides = Vec::new();
    let mut selection = Selection::default();
    for p in parts.take(8) {
        let s = String::from_utf8_lossy(p).into_owned();
        if let Some(st) = s.strip_prefix("only=") {
            selection.only = Some(st.to_string());
        } else if let Some(st) = s.strip_prefix("from=") {
            selection.from = Some(st.to_string());
        } else {
            overrides.push(s);
        }
    }
    let file = recipe_dir().join("r.yaml");
    let recipe = match Recipe::parse(&file, &text, &overrides) {
        Ok(r) => r,
        Err(e) => return shrink_fuzz::render(&e),
    };
    for s in &recipe.stages {
        for o in &s.outputs {
            assert!(
                o.starts_with(&recipe.output) && o != &recipe.output,
                "{} is outside the output folder {}",
                o.display(),
                recipe.output.display()
            );
        }
    }
    let _ = recipe.locate("stages.gate.budgets.min_top1");
    match recipe.plan(&selection) {
        Ok(plan) => {
            let _ = plan.render(&recipe);
        }
        Err(e) => shrink_fuzz::render(&e),
    }
});
