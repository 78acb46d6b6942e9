//! Running a plan: stages whose options and input files are unchanged since their last
//! successful run are skipped, state is recorded after each stage, and a lock keeps two
//! runs out of the same output folder.
//!
//! State lives in `<output>/.shrink/state.json`: per stage, SHA-256 hashes of its options
//! (canonical JSON), of every file it read and of every file it wrote. A stage re-runs when
//! any of these differ or an output is missing, so a changed input re-runs its stage, and
//! the stage's new outputs in turn re-run the stages that read them.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::plan::hex;
use super::{normalize, symlink_escape, ContextHint, Plan, PlannedStage, Recipe, StageKind};
use crate::printer;

/// Runs one stage of a recipe. The commands layer implements it over the real subcommands.
pub trait StageExecutor {
    /// Runs `stage`: reads `stage.inputs`, writes every path in `stage.outputs`. An error
    /// (including "this stage kind is not supported") stops the run and is returned as is.
    fn run_stage(&mut self, stage: &PlannedStage) -> Result<StageResult>;

    /// Checks what only the stages themselves can validate (e.g. gate budgets), after the
    /// recipe is loaded and before any stage runs. Errors should point into the recipe
    /// with [`Recipe::error_at`](super::Recipe::error_at).
    fn check(&mut self, _recipe: &super::Recipe, _plan: &super::Plan) -> Result<()> {
        Ok(())
    }
}

/// What a stage did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageResult {
    /// Files written inside the output folder, beyond the planned outputs (which are
    /// recorded whether listed here or not).
    pub outputs: Vec<PathBuf>,
    /// False when the stage ran but its check failed (a gate over budget): the run stops
    /// there and its summary reports failure.
    pub passed: bool,
}

impl StageResult {
    /// A stage that ran and wrote its planned outputs (plus `extra`).
    pub fn done(extra: Vec<PathBuf>) -> StageResult {
        StageResult {
            outputs: extra,
            passed: true,
        }
    }

    /// A gate's verdict.
    pub fn gate(passed: bool) -> StageResult {
        StageResult {
            outputs: Vec::new(),
            passed,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunOptions {
    /// Run every planned stage even when nothing changed.
    pub force: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StageStatus {
    /// Ran and succeeded.
    Ran,
    /// Options, inputs and outputs unchanged since its last successful run: not run.
    Unchanged,
    /// Ran, and its check failed.
    Failed,
    /// Not reached because an earlier stage failed.
    NotRun,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StageReport {
    pub kind: StageKind,
    pub status: StageStatus,
    /// Wall time of the stage; 0 when it did not run.
    pub seconds: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub stages: Vec<StageReport>,
}

impl RunSummary {
    /// True unless a stage's check failed (the caller maps false to exit code 1).
    pub fn passed(&self) -> bool {
        self.failed().is_none()
    }

    pub fn failed(&self) -> Option<StageKind> {
        self.with(StageStatus::Failed).into_iter().next()
    }

    pub fn with(&self, status: StageStatus) -> Vec<StageKind> {
        self.stages
            .iter()
            .filter(|s| s.status == status)
            .map(|s| s.kind)
            .collect()
    }
}

const STATE_SCHEMA: &str = "shrink.recipe-state/1";
const ABSENT: &str = "absent";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct State {
    schema: String,
    stages: BTreeMap<String, StageState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct StageState {
    options_sha256: String,
    /// Path → SHA-256 of each file read (`absent` for an optional file that was missing).
    inputs: BTreeMap<String, String>,
    /// Path → SHA-256 of each file written.
    outputs: BTreeMap<String, String>,
    finished_unix: u64,
}

impl State {
    fn empty() -> State {
        State {
            schema: STATE_SCHEMA.into(),
            stages: BTreeMap::new(),
        }
    }

    /// The recorded state, or an empty one when there is none or it cannot be read
    /// (then every stage simply runs again).
    fn load(path: &Path) -> State {
        let Ok(bytes) = std::fs::read(path) else {
            return State::empty();
        };
        match serde_json::from_slice::<State>(&bytes) {
            Ok(s) if s.schema == STATE_SCHEMA => s,
            _ => {
                printer::warn(format!(
                    "ignoring unreadable run state {}; every stage will run",
                    path.display()
                ));
                State::empty()
            }
        }
    }

    fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        crate::util::write_atomic(path, &json)
    }

    fn up_to_date(&self, stage: &PlannedStage, inputs: &BTreeMap<String, String>) -> Result<bool> {
        let Some(rec) = self.stages.get(stage.kind.name()) else {
            return Ok(false);
        };
        if rec.options_sha256 != stage.options_sha256 || &rec.inputs != inputs {
            return Ok(false);
        }
        for out in &stage.outputs {
            if !rec.outputs.contains_key(&key(out)) {
                return Ok(false);
            }
        }
        for (path, hash) in &rec.outputs {
            let p = Path::new(path);
            if !p.exists() || &hash_path(p)? != hash {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

fn key(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// SHA-256 of a file's bytes, or for a folder (an image dataset) of its sorted entries'
/// names and hashes.
fn hash_path(path: &Path) -> Result<String> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    if meta.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(path)
            .with_context(|| format!("cannot list {}", path.display()))?
            .collect::<std::io::Result<_>>()
            .with_context(|| format!("cannot list {}", path.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            // A linked folder is hashed by where it points, which also keeps link loops finite.
            let sub = if e.file_type()?.is_symlink() && p.is_dir() {
                format!("link:{}", std::fs::read_link(&p)?.display())
            } else {
                hash_path(&p)?
            };
            h.update(e.file_name().to_string_lossy().as_bytes());
            h.update([0]);
            h.update(sub.as_bytes());
            h.update([0]);
        }
    } else {
        let mut f = File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
        std::io::copy(&mut f, &mut h).with_context(|| format!("cannot read {}", path.display()))?;
    }
    Ok(hex(&h.finalize()))
}

/// Holds `<output>/.shrink/lock` for the lifetime of a run; the OS releases it if the
/// process dies, so a crashed run never leaves the folder locked.
struct Lock {
    _file: File,
}

impl Lock {
    fn acquire(output: &Path) -> Result<Lock> {
        let path = output.join(".shrink").join("lock");
        // Not truncated on open: the pid inside belongs to whoever holds the lock.
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open lock file {}", path.display()))?;
        let locked = fs4::fs_std::FileExt::try_lock_exclusive(&file)
            .with_context(|| format!("cannot lock {}", path.display()))?;
        if !locked {
            let pid = std::fs::read_to_string(&path).unwrap_or_default();
            let holder = match pid.trim() {
                "" => "another process".to_string(),
                pid => format!("pid {pid}"),
            };
            return Err(anyhow::anyhow!(
                "output folder {} is in use by another `shrink run` ({holder})",
                output.display()
            )
            .context_hint(
                "wait for that run to finish, or give this recipe another `output:`; two runs \
                 writing one folder would overwrite each other's files",
            ));
        }
        file.set_len(0)?;
        writeln!(file, "{}", std::process::id())?;
        Ok(Lock { _file: file })
    }
}

/// Runs `plan`, skipping unchanged stages and stopping at the first failure. A failed
/// check returns `Ok` with [`RunSummary::passed`] false; errors are returned as `Err`.
pub fn run(
    recipe: &Recipe,
    plan: &Plan,
    exec: &mut dyn StageExecutor,
    opts: &RunOptions,
) -> Result<RunSummary> {
    let out = &recipe.output;
    let state_dir = out.join(".shrink");
    if let Some(link) = symlink_escape(out, &state_dir.join("lock")) {
        bail!(
            "{} is a symbolic link leading outside the output folder {}",
            link.display(),
            out.display()
        );
    }
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("cannot create {}", state_dir.display()))?;
    let _lock = Lock::acquire(out)?;
    let state_path = state_dir.join("state.json");
    let mut state = State::load(&state_path);

    let mut reports: Vec<StageReport> = Vec::new();
    for (i, stage) in plan.stages.iter().enumerate() {
        let kind = stage.kind;
        for o in &stage.outputs {
            if let Some(link) = symlink_escape(out, o) {
                bail!(
                    "stage {kind} would write {} through the symbolic link {}, which leads outside the output folder {}",
                    o.display(),
                    link.display(),
                    out.display()
                );
            }
        }
        let mut inputs = BTreeMap::new();
        for input in &stage.inputs {
            if !input.path.exists() {
                if input.optional {
                    inputs.insert(key(&input.path), ABSENT.to_string());
                    continue;
                }
                let err = match input.made_by {
                    Some(by) => anyhow::anyhow!(
                        "stage {kind} reads {}, which stage {by} writes, but it does not exist yet",
                        input.path.display()
                    )
                    .context_hint(format!(
                        "run stage {by} first: drop --only, or use --from {by}"
                    )),
                    None => anyhow::anyhow!(
                        "stage {kind} reads {}, which no longer exists",
                        input.path.display()
                    ),
                };
                return Err(err);
            }
            inputs.insert(key(&input.path), hash_path(&input.path)?);
        }

        if !opts.force && state.up_to_date(stage, &inputs)? {
            printer::info(format!("{kind}: unchanged since its last run, skipped"));
            reports.push(StageReport {
                kind,
                status: StageStatus::Unchanged,
                seconds: 0.0,
            });
            continue;
        }

        printer::info(format!("{kind}: running"));
        let started = Instant::now();
        let result = exec
            .run_stage(stage)
            .with_context(|| format!("stage {kind} failed"))?;
        let seconds = started.elapsed().as_secs_f64();

        let mut written: BTreeSet<PathBuf> = stage.outputs.iter().cloned().collect();
        for p in &result.outputs {
            let p = normalize(&std::path::absolute(p)?);
            if !p.starts_with(out) {
                bail!(
                    "stage {kind} reported writing {}, outside the output folder {}",
                    p.display(),
                    out.display()
                );
            }
            written.insert(p);
        }

        if !result.passed {
            printer::info(format!("{kind}: failed"));
            reports.push(StageReport {
                kind,
                status: StageStatus::Failed,
                seconds,
            });
            reports.extend(plan.stages[i + 1..].iter().map(|s| StageReport {
                kind: s.kind,
                status: StageStatus::NotRun,
                seconds: 0.0,
            }));
            break;
        }

        let mut outputs = BTreeMap::new();
        for p in &written {
            if !p.exists() {
                bail!("stage {kind} finished without writing {}", p.display());
            }
            outputs.insert(key(p), hash_path(p)?);
        }
        let finished_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        state.stages.insert(
            kind.name().to_string(),
            StageState {
                options_sha256: stage.options_sha256.clone(),
                inputs,
                outputs,
                finished_unix,
            },
        );
        state
            .save(&state_path)
            .with_context(|| format!("cannot record the state of stage {kind}"))?;
        reports.push(StageReport {
            kind,
            status: StageStatus::Ran,
            seconds,
        });
    }
    Ok(RunSummary { stages: reports })
}
