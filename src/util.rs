//! Small helpers shared by every layer: atomic writes, path checks and memory limits.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

use crate::hint::HintExt;

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written,
/// synced and renamed over `path`, so readers see either the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes).map_err(Into::into))
}

/// Like [`write_atomic`], for writers that stream their output.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let mut builder = tempfile::Builder::new();
    builder.prefix(".shrink-tmp-");
    // Temporary files are private (0600) by default; an output gets the permissions of the
    // file it replaces, or those a plain create would give (0666 less the umask).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder
        .tempfile_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    if let Ok(meta) = std::fs::metadata(path) {
        // Best effort: a file we may replace but not chmod keeps the default permissions.
        let _ = tmp.as_file().set_permissions(meta.permissions());
    }
    {
        let mut buf = std::io::BufWriter::new(tmp.as_file_mut());
        write(&mut buf).with_context(|| format!("cannot write {}", path.display()))?;
        buf.flush()
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.persist(path).map_err(|e| e.error).with_context(|| {
        format!(
            "cannot move the finished file into place at {}",
            path.display()
        )
    })?;
    Ok(())
}

/// Environment variable that caps the memory shrink assumes it may use, in bytes (suffixes
/// `K`, `M`, `G` for KiB, MiB, GiB); below what the system reports, it wins.
pub const MEMORY_LIMIT_ENV: &str = "SHRINK_MEMORY_LIMIT";

/// Bytes of memory shrink may use: the smallest of `MemAvailable` in /proc/meminfo, the cgroup
/// limit minus current use (containers see the host's meminfo), and `SHRINK_MEMORY_LIMIT`.
/// None when none of these is known (then nothing is refused).
pub fn memory_available() -> Result<Option<u64>> {
    static SYSTEM: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    let system = *SYSTEM.get_or_init(system_memory_available);
    let env = match std::env::var(MEMORY_LIMIT_ENV) {
        Ok(v) => Some(parse_bytes(&v).with_context(|| {
            format!("{MEMORY_LIMIT_ENV}=`{v}` is not a byte count such as 4000000000 or 4G")
        })?),
        Err(_) => None,
    };
    Ok(match (system, env) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

fn parse_bytes(v: &str) -> Option<u64> {
    let v = v.trim();
    let (digits, unit) = match v.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => v.split_at(i),
        None => (v, ""),
    };
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return None,
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn system_memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kb| kb.saturating_mul(1024))
        });
    let read = |p: &str| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
    // cgroup v2, then v1 (whose "no limit" is a huge number, harmless under min).
    let cgroup = match read("/sys/fs/cgroup/memory.max") {
        Some(max) => Some(max.saturating_sub(read("/sys/fs/cgroup/memory.current").unwrap_or(0))),
        None => read("/sys/fs/cgroup/memory/memory.limit_in_bytes").map(|max| {
            max.saturating_sub(read("/sys/fs/cgroup/memory/memory.usage_in_bytes").unwrap_or(0))
        }),
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `1.5 GiB`-style sizes for messages.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// Refuses, before anything is allocated, a buffer of `bytes` (None: a size that overflows)
/// that would not fit in the memory available. `what` names the buffer and where its size
/// comes from, e.g. "tensor `conv1.weight` of model.onnx".
pub fn ensure_fits_in_memory(bytes: Option<u64>, what: impl FnOnce() -> String) -> Result<()> {
    let Some(bytes) = bytes else {
        return Err(anyhow::anyhow!(
            "{} declares a size that overflows a 64-bit byte count",
            what()
        ))
        .hint("the file is corrupt or hostile; re-export or re-download it");
    };
    if let Some(avail) = memory_available()? {
        if bytes > avail {
            return Err(anyhow::anyhow!(
                "{} declares {} ({bytes} bytes), more than the {} of memory available",
                what(),
                human_bytes(bytes),
                human_bytes(avail)
            ))
            .hint(format!(
                "the file may be corrupt or hostile; if it is genuine, free memory or use a larger machine ({MEMORY_LIMIT_ENV} sets the limit)"
            ));
        }
    }
    Ok(())
}

/// Product of `dims` times `elem_bytes`, None on overflow.
pub fn byte_size(dims: impl IntoIterator<Item = u64>, elem_bytes: u64) -> Option<u64> {
    dims.into_iter()
        .try_fold(elem_bytes, |a, d| a.checked_mul(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.txt");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[cfg(unix)]
    #[test]
    fn atomic_write_gives_outputs_ordinary_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.onnx");
        write_atomic(&p, b"new").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        // What a plain create gives (0666 less the umask), not a temporary file's 0600.
        std::fs::write(dir.path().join("plain"), b"x").unwrap();
        assert_eq!(mode(&p), mode(&dir.path().join("plain")));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        write_atomic(&p, b"newer").unwrap();
        assert_eq!(mode(&p), 0o640, "replacing a file keeps its permissions");
    }

    #[test]
    fn failed_write_keeps_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.txt");
        write_atomic(&p, b"old").unwrap();
        let r = write_atomic_with(&p, |w| {
            w.write_all(b"partial")?;
            anyhow::bail!("interrupted")
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}

#[cfg(test)]
mod memory_tests {
    use super::*;

    #[test]
    fn byte_counts_with_units_parse() {
        assert_eq!(parse_bytes("4096"), Some(4096));
        assert_eq!(parse_bytes("4K"), Some(4096));
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("1x"), None);
        assert_eq!(parse_bytes("99999999999T"), None);
    }

    #[test]
    fn oversized_claims_are_refused_before_allocating() {
        // Whatever this machine has, no machine has 2^62 bytes available.
        let e = ensure_fits_in_memory(Some(1 << 62), || "tensor `w`".into()).unwrap_err();
        let text = crate::hint::render(&e);
        assert!(text.contains("tensor `w` declares 4194304.0 TiB"), "{text}");
        assert!(text.contains("of memory available"), "{text}");
        let e = ensure_fits_in_memory(byte_size([u64::MAX, 2], 4), || "tensor `w`".into());
        assert!(format!("{:#}", e.unwrap_err()).contains("overflows"));
        ensure_fits_in_memory(Some(1024), || unreachable!()).unwrap();
    }

    #[test]
    fn system_memory_is_known_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(system_memory_available().is_some_and(|b| b > 0));
        }
    }
}
