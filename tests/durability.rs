//! Crash safety through the real binary: `distill` killed with SIGKILL at random points and
//! resumed, writes that hit a full disk, and two `shrink run`s on one output folder.
//!
//! Every output is written to a temporary file in its folder and renamed into place
//! (`util::write_atomic`), so a file at an output's name is always complete: the old version
//! or the new one.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::util::{Dir, Output};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
        .display()
        .to_string()
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_shrink")
}

/// Runs the binary with `args` in `dir`, returning what it printed.
fn output(cmd: &mut Command) -> Output {
    let out = cmd
        .env("NO_COLOR", "1")
        .env_remove("GITHUB_ACTIONS")
        .output()
        .expect("run the shrink binary");
    Output {
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        code: out.status.code().unwrap_or(-1),
    }
}

/// Files in `dir` (not recursive), sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A small xorshift generator: the kill points are random, but reproducible from the seed
/// that a failure prints.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn distill_args(out: &str, ckpt: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "distill",
        "--teacher",
        &fixture("teacher.onnx"),
        "--student",
        &fixture("student.onnx"),
        "--data",
        &fixture("digits_train.npz"),
        "--out",
        out,
        "--checkpoint-dir",
        ckpt,
        "--limit",
        "3000",
        "--batch-size",
        "32",
        "--epochs",
        "4",
        "--augment",
        "shift",
        "--threads",
        "1",
        "--seed",
        "11",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

#[test]
fn distill_killed_at_random_points_resumes_to_the_same_weights() {
    let d = Dir::new();
    let started = Instant::now();
    let straight = output(Command::new(bin()).current_dir(d.root()).args(distill_args(
        "straight.onnx",
        "ck0",
        &[],
    )));
    assert_eq!(straight.code, 0, "{}", straight.stderr);
    let total = started.elapsed();
    let want = std::fs::read(d.path("straight.onnx")).unwrap();

    let seed = std::env::var("SHRINK_KILL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    let mut rng = Rng(seed);
    let trials = 4;
    let mut resumed_from_checkpoint = 0;
    for trial in 0..trials {
        let (out, ck) = (format!("out{trial}.onnx"), format!("ck{trial}"));
        let mut child = Command::new(bin())
            .current_dir(d.root())
            .args(distill_args(&out, &ck, &[]))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // The first trial is killed at a random time in the first quarter of the run (likely
        // before any checkpoint); the others at a random time after a checkpoint exists, so
        // that resuming is exercised whatever the machine's speed.
        let t = Instant::now();
        if trial > 0 {
            let ckpt = d.path(&ck).join("last.ckpt");
            while !ckpt.exists() && t.elapsed() < total * 4 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let delay = total.mul_f64(rng.unit() / 4.0 * if trial == 0 { 1.0 } else { trial as f64 });
        std::thread::sleep(delay);
        child.kill().unwrap(); // SIGKILL: no destructor, no cleanup runs.
        child.wait().unwrap();
        let ctx = format!(
            "trial {trial}, killed after {:?} (uninterrupted: {total:?}; SHRINK_KILL_SEED={seed})",
            t.elapsed()
        );

        // No partial output: the model is absent, or complete because the run had finished.
        let model = d.path(&out);
        if model.exists() {
            assert_eq!(
                std::fs::read(&model).unwrap(),
                want,
                "{ctx}: a partial model"
            );
        }
        // Whatever the kill left at the checkpoint's name is a whole checkpoint (resuming
        // from it checks its contents); stray temporaries are never read.
        let ckpt = d.path(&ck).join("last.ckpt");
        let resume = ckpt.exists();
        let extra: &[&str] = if resume { &["--resume"] } else { &[] };
        let again = output(
            Command::new(bin())
                .current_dir(d.root())
                .args(distill_args(&out, &ck, extra)),
        );
        assert_eq!(again.code, 0, "{ctx}: {}", again.stderr);
        assert_eq!(
            std::fs::read(&model).unwrap(),
            want,
            "{ctx}: resumed={resume}: the weights differ from an uninterrupted run"
        );
        resumed_from_checkpoint += usize::from(resume);
        for name in names(d.root()).iter().chain(&names(&d.path(&ck))) {
            assert!(
                !name.ends_with(".onnx") || name.starts_with("out") || name == "straight.onnx",
                "{ctx}: unexpected file {name}"
            );
        }
    }
    assert!(
        resumed_from_checkpoint >= trials - 1,
        "only {resumed_from_checkpoint} of {trials} trials resumed from a checkpoint (SHRINK_KILL_SEED={seed})"
    );
}

// ---- Disk full -------------------------------------------------------------------------

/// Runs shrink with writes limited to `limit_bytes` per file (RLIMIT_FSIZE, with SIGXFSZ
/// ignored so that a write past it fails with EFBIG, as on a full disk, instead of killing
/// the process). Unprivileged, and works on any file system.
fn with_file_size_limit(d: &Dir, limit_bytes: u64, args: &[&str]) -> Output {
    // POSIX sh counts `ulimit -f` in 512-byte blocks.
    let script = format!(
        "trap '' XFSZ; ulimit -f {} || exit 97; exec \"$@\"",
        limit_bytes / 512
    );
    output(
        Command::new("sh")
            .current_dir(d.root())
            .arg("-c")
            .arg(script)
            .arg("sh")
            .arg(bin())
            .args(args),
    )
}

fn bench_json(json: &str) -> Vec<String> {
    [
        "bench",
        &fixture("student.onnx"),
        "--no-memory",
        "--warmup",
        "0",
        "--iterations",
        "50",
        "--threads",
        "1",
        "--json",
        json,
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn disk_full_keeps_the_previous_report_and_model() {
    let d = Dir::new();
    std::fs::create_dir(d.path("reports")).unwrap();
    let args = bench_json("reports/r.json");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let first = d.run(&refs);
    assert_eq!(first.code, 0, "{}", first.stderr);
    let previous = std::fs::read(d.path("reports/r.json")).unwrap();

    let out = with_file_size_limit(&d, 1024, &refs);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr.contains("error: cannot write reports/r.json"),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("File too large"), "{}", out.stderr);
    assert_eq!(std::fs::read(d.path("reports/r.json")).unwrap(), previous);
    assert_eq!(
        names(&d.path("reports")),
        ["r.json"],
        "a temporary file was left behind"
    );

    // A trained model (38 KB) over an older one.
    d.write("m.onnx", std::fs::read(fixture("student.onnx")).unwrap());
    let train = [
        "train",
        "--model",
        &fixture("student.onnx"),
        "--data",
        &fixture("digits_train.npz"),
        "--limit",
        "64",
        "--epochs",
        "1",
        "--threads",
        "1",
        "--out",
        "m.onnx",
        "--quiet",
    ];
    let out = with_file_size_limit(&d, 16 * 1024, &train);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(out.stderr.contains("File too large"), "{}", out.stderr);
    assert_eq!(
        std::fs::read(d.path("m.onnx")).unwrap(),
        std::fs::read(fixture("student.onnx")).unwrap()
    );
    assert!(
        !names(d.root()).iter().any(|n| n.starts_with(".shrink-tmp")),
        "{:?}",
        names(d.root())
    );
}

/// A real ENOSPC: a 256 KiB tmpfs, filled, in a private mount namespace (needs root and
/// `unshare`; where the machine refuses, the RLIMIT_FSIZE test above still runs).
#[test]
fn disk_full_on_a_full_filesystem_keeps_the_previous_report() {
    let d = Dir::new();
    std::fs::create_dir(d.path("disk")).unwrap();
    let args = bench_json("old.json");
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(d.run(&refs).code, 0);
    let probe = Command::new("unshare")
        .args(["-m", "sh", "-c", "mount -t tmpfs -o size=4k tmpfs \"$0\""])
        .arg(d.path("disk"))
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: cannot mount a tmpfs here (needs root and unshare)");
        return;
    }
    // Inside the namespace: mount, put the old report there, fill the disk, run shrink,
    // then report what the folder holds (the mount vanishes with the namespace).
    let script = r#"
        set -u
        disk="$1"; shift
        mount -t tmpfs -o size=256k tmpfs "$disk" || exit 97
        cp old.json "$disk/r.json"
        dd if=/dev/zero of="$disk/fill" bs=4096 2>/dev/null
        "$@" --json "$disk/r.json" 2>stderr.txt
        echo "exit=$?"
        cmp -s old.json "$disk/r.json" && echo "previous report intact"
        ls -A "$disk"
    "#;
    let out = output(
        Command::new("unshare")
            .current_dir(d.root())
            .args(["-m", "sh", "-c", script, "sh"])
            .arg(d.path("disk"))
            .arg(bin())
            .args(&args[..args.len() - 3]),
    );
    let stderr = std::fs::read_to_string(d.path("stderr.txt")).unwrap_or_default();
    assert!(out.stdout.contains("exit=2"), "{}\n{stderr}", out.stdout);
    assert!(stderr.contains("No space left on device"), "{stderr}");
    assert!(
        out.stdout.contains("previous report intact"),
        "{}",
        out.stdout
    );
    let listing: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| !l.contains('=') && !l.contains(' '))
        .collect();
    assert_eq!(listing, ["fill", "r.json"], "{}", out.stdout);
}

// ---- Two runs, one output folder --------------------------------------------------------

fn write_recipe(d: &Dir, iterations: usize) -> PathBuf {
    d.write(
        "r.yaml",
        format!(
            "output: out\ninputs:\n  m: {}\nstages:\n  bench:\n    models: [${{inputs.m}}]\n    \
             iterations: {iterations}\n    warmup: 0\n    threads: 1\n",
            fixture("student.onnx")
        ),
    )
}

#[test]
fn run_refuses_an_output_folder_another_run_holds() {
    let d = Dir::new();
    let r = write_recipe(&d, 5);
    std::fs::create_dir_all(d.path("out/.shrink")).unwrap();
    let lock = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(d.path("out/.shrink/lock"))
        .unwrap();
    assert!(fs4::fs_std::FileExt::try_lock_exclusive(&lock).unwrap());
    std::fs::write(d.path("out/.shrink/lock"), "4242\n").unwrap();
    let out = d.run(&["run", &r.display().to_string()]);
    assert_eq!(out.code, 2, "{}", out.stderr);
    assert!(
        out.stderr
            .contains("is in use by another `shrink run` (pid 4242)"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("hint: wait for that run to finish"),
        "{}",
        out.stderr
    );
    assert!(!d.path("out/bench.json").exists());
    drop(lock);
    let out = d.run(&["run", &r.display().to_string()]);
    assert_eq!(out.code, 0, "{}", out.stderr);
}

#[test]
fn two_runs_on_one_output_folder_do_not_interleave() {
    let d = Dir::new();
    // Long enough (a few seconds) for the second run to start while the first holds the lock.
    let r = write_recipe(&d, 20_000).display().to_string();
    let mut first = Command::new(bin())
        .current_dir(d.root())
        .args(["run", &r, "--quiet"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lock = d.path("out/.shrink/lock");
    let pid = first.id().to_string();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::read_to_string(&lock).map_or(true, |s| s.trim() != pid) {
        assert!(
            Instant::now() < deadline,
            "the first run never took the lock"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let second = d.run(&["run", &r]);
    let first_done = first.try_wait().unwrap().is_some();
    let status = first.wait_with_output().unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    if !first_done {
        assert_eq!(second.code, 2, "{}", second.stderr);
        assert!(
            second
                .stderr
                .contains(&format!("in use by another `shrink run` (pid {pid})")),
            "{}",
            second.stderr
        );
    }
    // The first run's report and state are whole and agree.
    let report = std::fs::read_to_string(d.path("out/bench.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        v["models"][0]["latency_ms"]["samples"]
            .as_array()
            .unwrap()
            .len(),
        20_000
    );
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path("out/.shrink/state.json")).unwrap())
            .unwrap();
    assert!(state["stages"]["bench"].is_object(), "{state}");
}
