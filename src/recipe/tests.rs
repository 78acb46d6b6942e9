//! Recipes end to end: loading, every kind of rejected recipe, planning, and running with
//! a fake executor that records its calls.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::*;
use crate::hint::Hinted;

const QUICKSTART: &str = "\
name: quickstart
output: ../out/quickstart          # output folder; every file the recipe writes goes inside it
inputs:
  teacher: ../fixtures/teacher.onnx
  student: ../fixtures/student.onnx
datasets:
  train: { path: ../fixtures/digits_train.npz }
  val:   { path: ../fixtures/digits_val.npz, limit: 500 }
stages:
  distill:
    teacher: ${inputs.teacher}
    student: ${inputs.student}
    data: ${datasets.train}
    val: ${datasets.val}
    epochs: 2
    temperature: 4.0
    alpha: 0.9
  quantize:
    model: ${distill.out}
    calibration: { data: ${datasets.train}, method: auto, samples: 300 }
  bench:
    models: [${inputs.teacher}, ${distill.out}, ${quantize.out}]
    backend: tract
    data: ${datasets.val}
  gate:
    report: ${bench.report}
    budgets: { max_size_bytes: 60000, min_top1: 0.9 }
";

/// A project folder: `fixtures/` with small stand-in files, recipes in `recipes/`.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Project {
        let dir = tempfile::tempdir().unwrap();
        let fx = dir.path().join("fixtures");
        std::fs::create_dir_all(&fx).unwrap();
        std::fs::create_dir_all(dir.path().join("recipes")).unwrap();
        for name in [
            "teacher.onnx",
            "student.onnx",
            "digits_train.npz",
            "digits_val.npz",
        ] {
            std::fs::write(fx.join(name), name.as_bytes()).unwrap();
        }
        Project { dir }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn out(&self) -> PathBuf {
        self.root().join("out/quickstart")
    }

    fn write_recipe(&self, text: &str) -> PathBuf {
        let p = self.root().join("recipes/r.yaml");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn load(&self, text: &str, sets: &[&str]) -> Result<Recipe> {
        let p = self.write_recipe(text);
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::load(&p, &sets)
    }

    /// Loads a malformed recipe: the error it gives, after checking nothing was written.
    fn fail(&self, text: &str, sets: &[&str]) -> (RecipeError, String) {
        let err = self
            .load(text, sets)
            .expect_err("the recipe should be rejected");
        assert!(
            !self.out().exists(),
            "nothing may be written for a rejected recipe"
        );
        let rendered = crate::hint::render(&err);
        let re = find_recipe_error(&err).unwrap_or_else(|| panic!("not a RecipeError: {rendered}"));
        (re, rendered)
    }
}

fn find_recipe_error(err: &anyhow::Error) -> Option<RecipeError> {
    fn inner(e: &anyhow::Error) -> Option<RecipeError> {
        if let Some(r) = e.downcast_ref::<RecipeError>() {
            return Some(r.clone());
        }
        e.downcast_ref::<Hinted>().and_then(|h| inner(&h.error))
    }
    inner(err)
}

fn at(e: &RecipeError) -> (usize, usize) {
    match e.location.origin {
        Origin::File { line, column } => (line, column),
        ref o => panic!("expected a file position, got {o:?}"),
    }
}

/// Records calls; writes each planned output with bytes derived from the stage's options
/// and input contents, as a deterministic real stage would.
#[derive(Default)]
struct FakeExecutor {
    calls: Vec<StageKind>,
    gate_passes: bool,
    unsupported: Option<StageKind>,
}

impl FakeExecutor {
    fn passing() -> Self {
        FakeExecutor {
            gate_passes: true,
            ..Default::default()
        }
    }
}

impl StageExecutor for FakeExecutor {
    fn run_stage(&mut self, stage: &PlannedStage) -> Result<StageResult> {
        self.calls.push(stage.kind);
        if self.unsupported == Some(stage.kind) {
            anyhow::bail!("unsupported stage `{}`", stage.kind);
        }
        let mut h = Sha256::new();
        h.update(stage.options_sha256.as_bytes());
        for input in &stage.inputs {
            if input.path.is_file() {
                h.update(std::fs::read(&input.path)?);
            }
        }
        let content = plan::hex(&h.finalize());
        for out in &stage.outputs {
            crate::util::write_atomic(out, content.as_bytes())?;
        }
        if stage.kind == StageKind::Gate {
            return Ok(StageResult::gate(self.gate_passes));
        }
        Ok(StageResult::done(Vec::new()))
    }
}

fn run_all(recipe: &Recipe, exec: &mut FakeExecutor) -> RunSummary {
    let plan = recipe.plan(&Selection::default()).unwrap();
    run(recipe, &plan, exec, &RunOptions::default()).unwrap()
}

fn kinds(names: &[&str]) -> Vec<StageKind> {
    names
        .iter()
        .map(|n| StageKind::from_name(n).unwrap())
        .collect()
}

#[test]
fn recipe_quickstart_parses_and_plans_in_dependency_order() {
    let p = Project::new();
    let r = p.load(QUICKSTART, &[]).unwrap();
    assert_eq!(r.name, "quickstart");
    assert_eq!(
        r.output,
        p.root().canonicalize().unwrap().join("out/quickstart")
    );
    let plan = r.plan(&Selection::default()).unwrap();
    let order: Vec<_> = plan.stages.iter().map(|s| s.kind).collect();
    assert_eq!(order, kinds(&["distill", "quantize", "bench", "gate"]));

    let StageOptions::Distill(d) = &plan.stages[0].options else {
        panic!()
    };
    assert_eq!(d.teacher.path, r.inputs["teacher"]);
    assert_eq!(d.epochs, 2);
    assert_eq!(d.batch_size, 64, "defaults are filled in");
    assert_eq!(d.out.path, r.output.join("distill.onnx"));
    assert_eq!(d.val.as_ref().unwrap().dataset.preprocess.limit, Some(500));
    assert_eq!(d.data.dataset.name.as_deref(), Some("train"));

    let StageOptions::Quantize(q) = &plan.stages[1].options else {
        panic!()
    };
    assert_eq!(q.model.made_by, Some(StageKind::Distill));
    assert_eq!(q.model.path, d.out.path);
    assert_eq!(plan.stages[1].needs, kinds(&["distill"]));

    let StageOptions::Bench(b) = &plan.stages[2].options else {
        panic!()
    };
    assert_eq!(b.models.len(), 3);
    assert_eq!(b.report.path, r.output.join("bench.json"));
    assert_eq!(plan.stages[2].needs, kinds(&["distill", "quantize"]));

    let StageOptions::Gate(g) = &plan.stages[3].options else {
        panic!()
    };
    let budgets = g.budgets.as_ref().unwrap();
    assert_eq!(budgets.value["min_top1"].as_f64(), Some(0.9));
    assert_eq!(
        budgets.location.as_ref().unwrap().origin,
        Origin::File {
            line: 27,
            column: 5
        }
    );
    assert_eq!(plan.stages[3].outputs, Vec::<PathBuf>::new());
    // Errors found later (by the gate module) can be located too.
    assert_eq!(
        r.locate("stages.gate.budgets.min_top1").origin,
        Origin::File {
            line: 27,
            column: 49
        }
    );
}

#[test]
fn recipe_examples_in_the_repository_load() {
    for (name, text) in [
        (
            "quickstart.yaml",
            include_str!("../../recipes/quickstart.yaml"),
        ),
        ("ci.yaml", include_str!("../../recipes/ci.yaml")),
    ] {
        let p = Project::new();
        let path = p.root().join("recipes").join(name);
        std::fs::write(&path, text).unwrap();
        let r = Recipe::load(&path, &[])
            .unwrap_or_else(|e| panic!("{name}: {}", crate::hint::render(&e)));
        r.plan(&Selection::default()).unwrap();
    }
}

#[test]
fn recipe_order_follows_references_with_ties_in_canonical_order() {
    let p = Project::new();
    // Written in reverse; train reads quantize's output, so quantize runs first.
    let text = "output: ../out/quickstart
stages:
  bench:
    models: [${train.out}]
  train:
    model: ${quantize.out}
    data: ../fixtures/digits_train.npz
  quantize:
    model: ../fixtures/teacher.onnx
    calibration: { data: ../fixtures/digits_train.npz }
  distill:
    teacher: ../fixtures/teacher.onnx
    student: ../fixtures/student.onnx
    data: ../fixtures/digits_train.npz
";
    let r = p.load(text, &[]).unwrap();
    let order: Vec<_> = r.stages.iter().map(|s| s.kind).collect();
    assert_eq!(order, kinds(&["distill", "quantize", "train", "bench"]));
    assert_eq!(r.name, "r", "the name defaults to the file stem");
}

#[test]
fn recipe_unknown_key_names_position_and_suggests() {
    let p = Project::new();
    let text = QUICKSTART.replace("    calibration: {", "    calibraton: {");
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.quantize.calibraton");
    assert_eq!(at(&e), (20, 5));
    assert!(
        e.message
            .contains("unknown key `calibraton`, did you mean `calibration`?"),
        "{rendered}"
    );
    assert!(rendered.starts_with(&format!(
        "error: {}:20:5: stages.quantize.calibraton:",
        e.location.file.display()
    )));
    assert!(
        rendered.contains("hint: valid keys here: model, out, calibration,"),
        "{rendered}"
    );
}

#[test]
fn recipe_unknown_dataset_key_suggests_among_preprocess_fields_and_path() {
    let p = Project::new();
    let text = QUICKSTART.replace("limit: 500", "limt: 500");
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "datasets.val.limt");
    assert_eq!(at(&e), (8, 46));
    assert!(e.message.contains("did you mean `limit`?"), "{rendered}");
    assert!(rendered.contains("path"), "{rendered}");
}

#[test]
fn recipe_wrong_type_says_what_was_expected() {
    let p = Project::new();
    let text = QUICKSTART.replace("samples: 300", "samples: many");
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.quantize.calibration.samples");
    assert_eq!(at(&e), (20, 68));
    assert!(e.message.contains("expected a whole number"), "{rendered}");
    assert!(e.message.contains("many"), "{rendered}");

    let text = QUICKSTART.replace("    epochs: 2", "    epochs: [2]");
    let (e, _) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.distill.epochs");
    assert_eq!(
        e.message,
        "wrong type: expected a whole number (0 or more), found a list"
    );

    let text = QUICKSTART.replace("epochs: 2", "epochs: -2");
    let (e, _) = p.fail(&text, &[]);
    assert_eq!(
        e.message,
        "wrong value: expected a whole number (0 or more), found integer `-2`"
    );
    assert_eq!(at(&e), (15, 13));

    let text = QUICKSTART.replace("method: auto", "method: percentil");
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.quantize.calibration.method");
    assert!(
        e.message.contains("did you mean `percentile`?"),
        "{rendered}"
    );
    assert!(rendered.contains("hint: expected one of: auto, minmax, percentile, entropy, mse"));
}

#[test]
fn recipe_missing_required_key_points_at_the_stage() {
    let p = Project::new();
    let text = QUICKSTART.replace("    teacher: ${inputs.teacher}\n", "");
    let (e, _) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.distill");
    assert_eq!(e.message, "missing required key `teacher`");
    assert_eq!(at(&e), (10, 3));
}

#[test]
fn recipe_missing_file_names_written_and_resolved_paths() {
    let p = Project::new();
    let text = QUICKSTART.replace("../fixtures/teacher.onnx", "../fixtures/techer.onnx");
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "inputs.teacher");
    assert_eq!(at(&e), (4, 12));
    let resolved = p
        .root()
        .canonicalize()
        .unwrap()
        .join("fixtures/techer.onnx");
    assert!(
        e.message.contains("`../fixtures/techer.onnx`"),
        "{rendered}"
    );
    assert!(
        e.message.contains(&resolved.display().to_string()),
        "{rendered}"
    );
    assert!(rendered.contains("hint: input paths are relative to the recipe's folder"));

    let text = QUICKSTART.replace("../fixtures/digits_val.npz", "val.npz");
    let (e, _) = p.fail(&text, &[]);
    assert_eq!(e.field, "datasets.val.path");
}

#[test]
fn recipe_unknown_reference_lists_valid_names() {
    let p = Project::new();
    let text = QUICKSTART.replace("teacher: ${inputs.teacher}", "teacher: ${inputs.techer}");
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.distill.teacher");
    assert_eq!(at(&e), (11, 14));
    assert!(e.message.contains("did you mean `teacher`?"), "{rendered}");
    assert!(
        rendered.contains("hint: inputs: student, teacher"),
        "{rendered}"
    );

    let text = QUICKSTART.replace(
        "models: [${inputs.teacher}, ${distill.out}",
        "models: [${inputs.teacher}, ${train.out}",
    );
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.bench.models[1]");
    assert_eq!(at(&e), (22, 33));
    assert!(
        e.message
            .contains("stage `train`, which is not in this recipe"),
        "{rendered}"
    );
    assert!(
        rendered.contains("${distill.out}, ${quantize.out}, ${bench.report}"),
        "{rendered}"
    );

    let text = QUICKSTART.replace(
        "data: ${datasets.val}\n  gate",
        "data: ${datasets.test}\n  gate",
    );
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.bench.data");
    assert!(
        rendered.contains("hint: datasets: train, val"),
        "{rendered}"
    );

    let text = QUICKSTART.replace("report: ${bench.report}", "report: ${bench.out}");
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.gate.report");
    assert!(
        e.message.contains("stage bench writes `${bench.report}`"),
        "{rendered}"
    );

    let text = QUICKSTART.replace("model: ${distill.out}", "model: ${distil.out}");
    let (e, _) = p.fail(&text, &[]);
    assert!(
        e.message.contains("did you mean `distill`?"),
        "{}",
        e.message
    );

    let text = QUICKSTART.replace("model: ${distill.out}", "model: models/${distill.out}");
    let (e, _) = p.fail(&text, &[]);
    assert!(e.message.contains("is not a reference"), "{}", e.message);

    let text = QUICKSTART.replace("model: ${distill.out}", "model: ${datasets.train}");
    let (e, _) = p.fail(&text, &[]);
    assert!(
        e.message
            .contains("is a dataset, but this field takes a file"),
        "{}",
        e.message
    );
}

#[test]
fn recipe_unknown_stage_kind_lists_the_kinds() {
    let p = Project::new();
    let text = QUICKSTART.replace("  gate:\n", "  prune:\n    amount: 0.5\n  gate:\n");
    let (e, rendered) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.prune");
    assert_eq!(at(&e), (25, 3));
    assert!(
        e.message.contains("unknown stage kind `prune`"),
        "{rendered}"
    );
    assert!(
        rendered.contains("hint: stage kinds: distill, train, quantize, bench, gate"),
        "{rendered}"
    );
}

#[test]
fn recipe_cycle_is_named() {
    let p = Project::new();
    let text = QUICKSTART.replace("student: ${inputs.student}", "student: ${quantize.out}");
    let (e, rendered) = p.fail(&text, &[]);
    assert!(
        e.message
            .contains("stages form a cycle: distill → quantize → distill"),
        "{rendered}"
    );
    assert!(
        e.message
            .contains("stages.distill.student reads ${quantize.out}"),
        "{rendered}"
    );
    assert!(
        e.message
            .contains("stages.quantize.model reads ${distill.out}"),
        "{rendered}"
    );
    assert_eq!(e.field, "stages.distill.student");
    assert_eq!(at(&e), (12, 14));

    let text = QUICKSTART.replace("model: ${distill.out}", "model: ${quantize.out}");
    let (e, _) = p.fail(&text, &[]);
    assert!(
        e.message.contains("cycle: quantize → quantize"),
        "{}",
        e.message
    );
}

#[test]
fn recipe_bad_yaml_names_line_and_column() {
    let p = Project::new();
    let text = QUICKSTART.replace("    epochs: 2\n", "    epochs: 2\n   temperature: 4.0\n");
    let (e, rendered) = p.fail(&text, &[]);
    assert!(e.message.starts_with("invalid YAML"), "{rendered}");
    let (line, _) = at(&e);
    assert_eq!(line, 16);
    assert!(rendered.contains("hint:"), "{rendered}");

    // A flow mapping left open: the position is mapped back past the quoted references.
    let text = "output: o\nstages:\n  bench:\n    models: [${a.b}, ${c.d}\n";
    let (e, _) = p.fail(text, &[]);
    assert!(e.message.starts_with("invalid YAML"), "{}", e.message);
    assert!(matches!(e.location.origin, Origin::File { .. }));

    let (e, _) = p.fail("", &[]);
    assert_eq!(e.message, "the recipe is empty");
}

#[test]
fn recipe_output_paths_cannot_leave_the_output_folder() {
    let p = Project::new();
    let insert = |out: &str| {
        QUICKSTART.replace(
            "    epochs: 2\n",
            &format!("    epochs: 2\n    out: {out}\n"),
        )
    };
    for bad in [
        "../escape.onnx",
        "sub/../../escape.onnx",
        "/tmp/escape.onnx",
        ".shrink/state.json",
        ".",
    ] {
        let (e, rendered) = p.fail(&insert(bad), &[]);
        assert_eq!(e.field, "stages.distill.out", "{bad}");
        assert_eq!(at(&e), (16, 10), "{bad}");
        assert!(
            rendered.contains("hint: output paths are relative to the output folder"),
            "{rendered}"
        );
    }
    // Absolute paths inside the folder are fine.
    let inside = p
        .root()
        .canonicalize()
        .unwrap()
        .join("out/quickstart/models/s.onnx");
    let r = p.load(&insert(&inside.display().to_string()), &[]).unwrap();
    assert_eq!(r.stage(StageKind::Distill).unwrap().outputs, vec![inside]);
    assert!(!p.out().exists());

    let text = QUICKSTART.replace(
        "    backend: tract\n",
        "    backend: tract\n    markdown: ../../README.md\n",
    );
    let (e, _) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.bench.markdown");

    let text = QUICKSTART.replace(
        "    backend: tract\n",
        "    backend: tract\n    report: distill.onnx\n",
    );
    let (e, _) = p.fail(&text, &[]);
    assert!(
        e.message.contains("is also written by stages.distill.out"),
        "{}",
        e.message
    );
}

#[cfg(unix)]
#[test]
fn recipe_symlinks_in_the_output_folder_cannot_lead_outside() {
    let p = Project::new();
    let outside = p.root().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::create_dir_all(p.out()).unwrap();
    std::os::unix::fs::symlink(&outside, p.out().join("models")).unwrap();
    let text = QUICKSTART.replace("    epochs: 2\n", "    epochs: 2\n    out: models/s.onnx\n");
    let err = p.load(&text, &[]).unwrap_err();
    let e = find_recipe_error(&err).unwrap();
    assert_eq!(e.field, "stages.distill.out");
    assert!(e.message.contains("symbolic link"), "{}", e.message);
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);

    // A link that appears after loading is caught before the stage runs.
    let r = p.load(QUICKSTART, &[]).unwrap();
    std::fs::remove_file(p.out().join("models")).unwrap();
    std::os::unix::fs::symlink(&outside, p.out().join("distill.onnx")).unwrap();
    let plan = r.plan(&Selection::default()).unwrap();
    let mut exec = FakeExecutor::passing();
    let err = run(&r, &plan, &mut exec, &RunOptions::default()).unwrap_err();
    assert!(err.to_string().contains("symbolic link"), "{err}");
    assert!(exec.calls.is_empty());
}

#[test]
fn recipe_outputs_cannot_overwrite_inputs() {
    let p = Project::new();
    let text = QUICKSTART
        .replace("output: ../out/quickstart", "output: ../fixtures")
        .replace("    epochs: 2\n", "    epochs: 2\n    out: teacher.onnx\n");
    let err = p.load(&text, &[]).unwrap_err();
    let e = find_recipe_error(&err).unwrap();
    assert_eq!(e.field, "stages.distill.out");
    assert!(e.message.contains("would overwrite"), "{}", e.message);
}

#[test]
fn recipe_range_checks() {
    let p = Project::new();
    let (e, _) = p.fail(&QUICKSTART.replace("alpha: 0.9", "alpha: 1.5"), &[]);
    assert_eq!(
        (e.field.as_str(), e.message.as_str()),
        ("stages.distill.alpha", "must be between 0 and 1")
    );
    assert_eq!(at(&e), (17, 12));
    let (e, _) = p.fail(
        &QUICKSTART.replace(
            "    calibration: { data: ${datasets.train}, method: auto, samples: 300 }\n",
            "",
        ),
        &[],
    );
    assert_eq!(e.field, "stages.quantize");
    assert!(e.message.contains("missing required key `calibration`"));
}

#[test]
fn recipe_set_overrides_values() {
    let p = Project::new();
    let r = p
        .load(
            QUICKSTART,
            &[
                "quantize.calibration.method=percentile",
                "distill.epochs=1",
                "datasets.val.limit=10",
            ],
        )
        .unwrap();
    let Some(Stage {
        options: StageOptions::Quantize(q),
        ..
    }) = r.stage(StageKind::Quantize)
    else {
        panic!()
    };
    assert_eq!(
        q.calibration.as_ref().unwrap().method,
        CalibrationMethod::Percentile
    );
    let Some(Stage {
        options: StageOptions::Distill(d),
        ..
    }) = r.stage(StageKind::Distill)
    else {
        panic!()
    };
    assert_eq!(d.epochs, 1);
    assert_eq!(d.val.as_ref().unwrap().dataset.preprocess.limit, Some(10));
    // Later flags win; references work in values.
    let r = p
        .load(
            QUICKSTART,
            &[
                "distill.epochs=1",
                "distill.epochs=3",
                "bench.models=[${quantize.out}]",
            ],
        )
        .unwrap();
    let Some(Stage {
        options: StageOptions::Distill(d),
        ..
    }) = r.stage(StageKind::Distill)
    else {
        panic!()
    };
    assert_eq!(d.epochs, 3);
    assert_eq!(
        r.stage(StageKind::Bench).unwrap().needs,
        kinds(&["quantize"])
    );
}

#[test]
fn recipe_set_is_validated_like_the_file() {
    let p = Project::new();
    let (e, rendered) = p.fail(QUICKSTART, &["quantize.calibration.methd=percentile"]);
    assert_eq!(
        e.location.origin,
        Origin::Flag("quantize.calibration.methd=percentile".into())
    );
    assert_eq!(e.field, "stages.quantize.calibration.methd");
    assert!(e.message.contains("did you mean `method`?"), "{rendered}");
    assert!(
        rendered.contains("--set quantize.calibration.methd=percentile"),
        "{rendered}"
    );

    let (e, _) = p.fail(QUICKSTART, &["quantize.calibraton.method=percentile"]);
    assert_eq!(
        e.location.origin,
        Origin::Flag("quantize.calibraton.method=percentile".into())
    );
    assert!(
        e.message.contains("did you mean `calibration`?"),
        "{}",
        e.message
    );

    let (e, _) = p.fail(QUICKSTART, &["distill.epochs=many"]);
    assert_eq!(
        e.location.origin,
        Origin::Flag("distill.epochs=many".into())
    );
    assert!(e.message.contains("expected a whole number"));

    let (e, rendered) = p.fail(QUICKSTART, &["train.epochs=1"]);
    assert!(
        e.message.contains("stage `train` is not in this recipe"),
        "{rendered}"
    );
    assert!(
        rendered.contains("stages in this recipe: distill, quantize, bench, gate"),
        "{rendered}"
    );

    let (e, _) = p.fail(QUICKSTART, &["distil.epochs=1"]);
    assert!(
        e.message.contains("did you mean `distill`?"),
        "{}",
        e.message
    );

    let (e, _) = p.fail(QUICKSTART, &["distill.epochs"]);
    assert!(e.message.contains("expected STAGE.PATH=VALUE"));

    let (e, _) = p.fail(QUICKSTART, &["distill.epochs.x=1"]);
    assert!(e.message.contains("is not a mapping"), "{}", e.message);

    // Errors elsewhere still point at the file.
    let text = QUICKSTART.replace("samples: 300", "samples: x");
    let (e, _) = p.fail(&text, &["distill.epochs=1"]);
    assert_eq!(at(&e), (20, 68));
}

#[test]
fn recipe_unchanged_stages_are_skipped() {
    let p = Project::new();
    let r = p.load(QUICKSTART, &[]).unwrap();
    let mut exec = FakeExecutor::passing();
    let s = run_all(&r, &mut exec);
    assert!(s.passed());
    assert_eq!(
        s.with(StageStatus::Ran),
        kinds(&["distill", "quantize", "bench", "gate"])
    );
    assert_eq!(exec.calls, kinds(&["distill", "quantize", "bench", "gate"]));

    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p.out().join(".shrink/state.json")).unwrap())
            .unwrap();
    assert_eq!(state["schema"], "shrink.recipe-state/1");
    let distill = &state["stages"]["distill"];
    assert_eq!(distill["options_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(distill["inputs"].as_object().unwrap().len(), 4);
    assert!(distill["outputs"]
        .get(r.output.join("distill.onnx").to_str().unwrap())
        .is_some());

    let mut exec = FakeExecutor::passing();
    let s = run_all(&r, &mut exec);
    assert!(exec.calls.is_empty());
    assert_eq!(s.with(StageStatus::Unchanged).len(), 4);

    // --force runs anyway.
    let plan = r.plan(&Selection::default()).unwrap();
    let mut exec = FakeExecutor::passing();
    run(&r, &plan, &mut exec, &RunOptions { force: true }).unwrap();
    assert_eq!(exec.calls.len(), 4);
}

#[test]
fn recipe_changed_input_reruns_its_stage_and_dependents() {
    let p = Project::new();
    let r = p.load(QUICKSTART, &[]).unwrap();
    run_all(&r, &mut FakeExecutor::passing());

    // The student only feeds distill; its new output then re-runs everything downstream.
    std::fs::write(p.root().join("fixtures/student.onnx"), b"changed").unwrap();
    let mut exec = FakeExecutor::passing();
    run_all(&r, &mut exec);
    assert_eq!(exec.calls, kinds(&["distill", "quantize", "bench", "gate"]));

    // Changed options re-run that stage and what reads its output, nothing upstream.
    let r = p.load(QUICKSTART, &["bench.iterations=5"]).unwrap();
    let mut exec = FakeExecutor::passing();
    run_all(&r, &mut exec);
    assert_eq!(exec.calls, kinds(&["bench", "gate"]));

    // A missing or edited output re-runs the stage that writes it.
    std::fs::remove_file(r.output.join("quantize.onnx")).unwrap();
    let mut exec = FakeExecutor::passing();
    run_all(&r, &mut exec);
    assert_eq!(
        exec.calls,
        kinds(&["quantize"]),
        "same bytes again, so bench is unchanged"
    );
    std::fs::write(r.output.join("bench.json"), b"{}").unwrap();
    let mut exec = FakeExecutor::passing();
    run_all(&r, &mut exec);
    assert_eq!(exec.calls, kinds(&["bench"]));
}

#[test]
fn recipe_failed_gate_stops_and_rerun_skips_distill() {
    let p = Project::new();
    let r = p.load(QUICKSTART, &[]).unwrap();
    let mut exec = FakeExecutor::default();
    let s = run_all(&r, &mut exec);
    assert!(!s.passed());
    assert_eq!(s.failed(), Some(StageKind::Gate));
    assert_eq!(exec.calls, kinds(&["distill", "quantize", "bench", "gate"]));

    // The budgets are relaxed; only the gate runs again.
    let r = p.load(QUICKSTART, &["gate.budgets.min_top1=0.5"]).unwrap();
    let mut exec = FakeExecutor::passing();
    let s = run_all(&r, &mut exec);
    assert!(s.passed());
    assert_eq!(exec.calls, kinds(&["gate"]));
    assert_eq!(
        s.with(StageStatus::Unchanged),
        kinds(&["distill", "quantize", "bench"])
    );

    // A failed gate is not recorded, so an unchanged rerun checks again.
    let r = p.load(QUICKSTART, &[]).unwrap();
    run_all(&r, &mut FakeExecutor::default());
    let mut exec = FakeExecutor::default();
    run_all(&r, &mut exec);
    assert_eq!(exec.calls, kinds(&["gate"]));
}

#[test]
fn recipe_unsupported_stage_error_propagates() {
    let p = Project::new();
    let r = p.load(QUICKSTART, &[]).unwrap();
    let plan = r.plan(&Selection::default()).unwrap();
    let mut exec = FakeExecutor {
        unsupported: Some(StageKind::Quantize),
        ..FakeExecutor::passing()
    };
    let err = run(&r, &plan, &mut exec, &RunOptions::default()).unwrap_err();
    let text = crate::hint::render(&err);
    assert!(text.contains("stage quantize failed"), "{text}");
    assert!(text.contains("unsupported stage `quantize`"), "{text}");
    assert_eq!(exec.calls, kinds(&["distill", "quantize"]));
    let state = std::fs::read_to_string(p.out().join(".shrink/state.json")).unwrap();
    assert!(state.contains("\"distill\"") && !state.contains("\"quantize\""));
}

#[test]
fn recipe_lock_held_makes_a_second_run_fail_at_once() {
    let p = Project::new();
    let r = p.load(QUICKSTART, &[]).unwrap();
    let lock_path = p.out().join(".shrink/lock");
    std::fs::create_dir_all(lock_path.parent().unwrap()).unwrap();
    let holder = std::fs::File::create(&lock_path).unwrap();
    assert!(fs4::fs_std::FileExt::try_lock_exclusive(&holder).unwrap());
    std::fs::write(&lock_path, "4242\n").unwrap();

    let plan = r.plan(&Selection::default()).unwrap();
    let mut exec = FakeExecutor::passing();
    let err = run(&r, &plan, &mut exec, &RunOptions::default()).unwrap_err();
    let text = crate::hint::render(&err);
    assert!(
        text.contains(&format!("output folder {} is in use", r.output.display())),
        "{text}"
    );
    assert!(text.contains("pid 4242"), "{text}");
    assert!(text.contains("hint:"), "{text}");
    assert!(exec.calls.is_empty());
    assert!(!p.out().join(".shrink/state.json").exists());

    drop(holder);
    let mut exec = FakeExecutor::passing();
    run(&r, &plan, &mut exec, &RunOptions::default()).unwrap();
    assert_eq!(exec.calls.len(), 4);
    let pid = std::fs::read_to_string(&lock_path).unwrap();
    assert_eq!(pid.trim(), std::process::id().to_string());
}

#[test]
fn recipe_only_and_from_select_stages() {
    let p = Project::new();
    let r = p.load(QUICKSTART, &[]).unwrap();
    let sel = |only: Option<&str>, from: Option<&str>| Selection {
        only: only.map(str::to_string),
        from: from.map(str::to_string),
    };
    let plan = r.plan(&sel(Some("quantize"), None)).unwrap();
    assert_eq!(
        plan.stages.iter().map(|s| s.kind).collect::<Vec<_>>(),
        kinds(&["quantize"])
    );
    let plan = r.plan(&sel(None, Some("bench"))).unwrap();
    assert_eq!(
        plan.stages.iter().map(|s| s.kind).collect::<Vec<_>>(),
        kinds(&["bench", "gate"])
    );

    // --only on a fresh folder: the stage's input from distill does not exist yet.
    let plan = r.plan(&sel(Some("quantize"), None)).unwrap();
    let mut exec = FakeExecutor::passing();
    let err = run(&r, &plan, &mut exec, &RunOptions::default()).unwrap_err();
    let text = crate::hint::render(&err);
    assert!(text.contains("which stage distill writes"), "{text}");
    assert!(text.contains("hint: run stage distill first"), "{text}");
    assert!(exec.calls.is_empty());

    run_all(&r, &mut FakeExecutor::passing());
    let plan = r.plan(&sel(None, Some("bench"))).unwrap();
    let mut exec = FakeExecutor::passing();
    run(&r, &plan, &mut exec, &RunOptions { force: true }).unwrap();
    assert_eq!(exec.calls, kinds(&["bench", "gate"]));

    let err = r.plan(&sel(Some("quantise"), None)).unwrap_err();
    let text = crate::hint::render(&err);
    assert!(
        text.contains("--only quantise: unknown stage, did you mean `quantize`?"),
        "{text}"
    );
    assert!(
        text.contains("hint: stages in this recipe: distill, quantize, bench, gate"),
        "{text}"
    );
    let err = r.plan(&sel(None, Some("train"))).unwrap_err();
    assert!(err.to_string().contains("stage `train` is not in"), "{err}");
}

#[test]
fn recipe_bench_models_take_names() {
    let p = Project::new();
    let text = QUICKSTART.replace(
        "${quantize.out}]",
        "int8=${quantize.out}, fp32=../fixtures/student.onnx]",
    );
    let r = p.load(&text, &[]).unwrap();
    let Some(Stage {
        options: StageOptions::Bench(b),
        ..
    }) = r.stage(StageKind::Bench)
    else {
        panic!()
    };
    assert_eq!(b.models[2].name.as_deref(), Some("int8"));
    assert_eq!(b.models[2].model.made_by, Some(StageKind::Quantize));
    assert_eq!(b.models[3].name.as_deref(), Some("fp32"));
    assert!(b.models[3].model.path.ends_with("fixtures/student.onnx"));
    assert_eq!(b.models[0].name, None);
}

#[test]
fn recipe_gate_baseline_may_live_outside_and_not_exist_when_updated() {
    let p = Project::new();
    let text = QUICKSTART.replace(
        "    budgets:",
        "    baseline: ../baseline.json\n    budgets:",
    );
    let (e, _) = p.fail(&text, &[]);
    assert_eq!(e.field, "stages.gate.baseline");
    assert!(e.message.contains("file not found"));

    let text = text.replace("    budgets:", "    update_baseline: true\n    budgets:");
    let r = p.load(&text, &[]).unwrap();
    let gate = r.stage(StageKind::Gate).unwrap();
    assert!(gate
        .inputs
        .iter()
        .any(|i| i.optional && i.path.ends_with("baseline.json")));
    assert!(gate.outputs.is_empty());
    run_all(&r, &mut FakeExecutor::passing());
}

#[test]
fn recipe_dry_run_rendering_lists_stages_options_and_files() {
    let p = Project::new();
    let r = p.load(QUICKSTART, &[]).unwrap();
    let text = r.plan(&Selection::default()).unwrap().render(&r);
    assert!(text.starts_with("recipe quickstart ("), "{text}");
    assert!(text.contains("\n1. distill\n"), "{text}");
    assert!(text.contains("\n2. quantize  (after distill)\n"), "{text}");
    assert!(text.contains("\n4. gate  (after bench)\n"), "{text}");
    assert!(
        text.contains("reads   ") && text.contains("(from distill)"),
        "{text}"
    );
    assert!(
        text.contains("writes  ") && text.contains("distill.onnx"),
        "{text}"
    );
    assert!(text.contains("calibration.method"), "{text}");
    assert!(text.contains("budgets.min_top1"), "{text}");
    assert!(!p.out().exists());
}

#[test]
fn recipe_dataset_shorthand_and_empty_stage() {
    let p = Project::new();
    let text = QUICKSTART.replace(
        "  train: { path: ../fixtures/digits_train.npz }",
        "  train: ../fixtures/digits_train.npz",
    );
    let r = p.load(&text, &[]).unwrap();
    assert_eq!(
        r.datasets["train"].preprocess,
        crate::data::Preprocess::default()
    );
    assert!(r.datasets["train"]
        .path
        .ends_with("fixtures/digits_train.npz"));

    // `gate:` with nothing under it is reported, not dropped.
    let text = QUICKSTART.replace(
        "    report: ${bench.report}\n    budgets: { max_size_bytes: 60000, min_top1: 0.9 }\n",
        "",
    );
    let (e, _) = p.fail(&text, &[]);
    assert_eq!(
        (e.field.as_str(), e.message.as_str()),
        ("stages.gate", "missing required key `report`")
    );
    assert_eq!(at(&e), (25, 3));
}
