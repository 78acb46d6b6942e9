//! Training checkpoints: everything needed to continue a run bit for bit (parameters,
//! batch-norm state, optimizer buffers, RNG position, epoch, best-so-far weights, metrics
//! history), in one file written atomically after every epoch.
//!
//! Layout: the 8 bytes `SHRKCKPT`, a little-endian u32 format version, a little-endian u64
//! header length, the header as JSON, then the tensors' f32 values, little-endian, in the
//! order the header lists them. Floats are stored as raw bits because a resumed run must
//! see exactly the values the interrupted one held.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::optim::Named;
use crate::engine::Tensor;
use crate::hint::HintExt;

const MAGIC: &[u8; 8] = b"SHRKCKPT";
const VERSION: u32 = 1;
/// The file `--checkpoint-dir` holds: the state after the latest finished epoch.
pub const FILE_NAME: &str = "last.ckpt";

/// The best validation result so far.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub epoch: usize,
    pub val_acc: f64,
}

/// Scalars of a checkpoint; tensors travel beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// Hash of the settings and inputs that shape the run; resuming with others is refused.
    pub fingerprint: String,
    /// Epochs finished.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub step: u64,
    pub seed: u64,
    /// ChaCha word position of the training RNG (a u128, as a decimal string).
    pub rng_word_pos: String,
    pub best: Option<Best>,
    /// Per-parameter optimizer step counts.
    pub optimizer_steps: BTreeMap<String, u64>,
    /// Metrics lines of the finished epochs, so a resumed run's metrics file is whole.
    pub metrics: Vec<serde_json::Value>,
    pub threads: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    meta: Meta,
    tensors: Vec<Entry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    name: String,
    shape: Vec<usize>,
}

/// A checkpoint: scalars plus tensors named by group, e.g. `param/fc.weight`,
/// `state/bn1.running_mean`, `optim/momentum/fc.weight`, `best/param/fc.weight`.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub meta: Meta,
    pub tensors: Named,
}

impl Checkpoint {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(FILE_NAME)
    }

    /// Writes the checkpoint to `path` atomically: an interrupted write leaves the previous
    /// checkpoint in place.
    pub fn save(&self, path: &Path) -> Result<()> {
        let header = Header {
            meta: self.meta.clone(),
            tensors: self
                .tensors
                .iter()
                .map(|(k, t)| Entry {
                    name: k.clone(),
                    shape: t.shape.clone(),
                })
                .collect(),
        };
        let json = serde_json::to_vec(&header)?;
        crate::util::write_atomic_with(path, |w| {
            w.write_all(MAGIC)?;
            w.write_all(&VERSION.to_le_bytes())?;
            w.write_all(&(json.len() as u64).to_le_bytes())?;
            w.write_all(&json)?;
            let mut buf = Vec::new();
            for t in self.tensors.values() {
                buf.clear();
                buf.extend(t.data.iter().flat_map(|v| v.to_le_bytes()));
                w.write_all(&buf)?;
            }
            Ok(())
        })
        .with_context(|| format!("cannot write checkpoint {}", path.display()))
    }

    pub fn load(path: &Path) -> Result<Checkpoint> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read checkpoint {}", path.display()))
            .hint("--resume continues from <checkpoint-dir>/last.ckpt, written after each epoch of a run with --checkpoint-dir")?;
        Self::decode(&bytes).with_context(|| {
            format!(
                "checkpoint {} is damaged or not a shrink checkpoint",
                path.display()
            )
        })
    }

    fn decode(bytes: &[u8]) -> Result<Checkpoint> {
        ensure!(
            bytes.len() >= 20 && &bytes[..8] == MAGIC,
            "missing the SHRKCKPT signature"
        );
        let version = u32::from_le_bytes(bytes[8..12].try_into()?);
        ensure!(
            version == VERSION,
            "format version {version}; this shrink reads version {VERSION}"
        );
        let hlen = usize::try_from(u64::from_le_bytes(bytes[12..20].try_into()?))?;
        let body = &bytes[20..];
        ensure!(
            hlen <= body.len(),
            "the header runs past the end of the file"
        );
        let header: Header = serde_json::from_slice(&body[..hlen]).context("unreadable header")?;
        let mut data = &body[hlen..];
        let mut tensors = Named::new();
        for e in header.tensors {
            let n: usize = e
                .shape
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .context("tensor size overflows")?;
            let len = n.checked_mul(4).context("tensor size overflows")?;
            if data.len() < len {
                bail!("tensor `{}` is cut short", e.name);
            }
            let values = data[..len]
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            data = &data[len..];
            tensors.insert(
                e.name,
                Tensor {
                    shape: e.shape,
                    data: values,
                },
            );
        }
        ensure!(
            data.is_empty(),
            "{} bytes follow the last tensor",
            data.len()
        );
        Ok(Checkpoint {
            meta: header.meta,
            tensors,
        })
    }

    /// The tensors of one group (`param`, `state`, `optim`, ...), with the prefix removed.
    pub fn group(&self, group: &str) -> Named {
        let prefix = format!("{group}/");
        self.tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(&prefix).map(|n| (n.to_string(), t.clone())))
            .collect()
    }

    /// Adds `tensors` under `group/`.
    pub fn put(&mut self, group: &str, tensors: &Named) {
        for (k, t) in tensors {
            self.tensors.insert(format!("{group}/{k}"), t.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        let mut c = Checkpoint {
            meta: Meta {
                fingerprint: "abc".into(),
                epoch: 2,
                step: 126,
                seed: 7,
                rng_word_pos: u128::MAX.to_string(),
                best: Some(Best {
                    epoch: 1,
                    val_acc: 0.75,
                }),
                optimizer_steps: [("w".to_string(), 3u64)].into(),
                metrics: vec![serde_json::json!({"epoch": 1})],
                threads: 2,
            },
            tensors: Named::new(),
        };
        let mut p = Named::new();
        p.insert(
            "w".into(),
            Tensor::new(vec![2, 2], vec![1.0, -0.0, f32::MIN_POSITIVE, 3.5]).unwrap(),
        );
        p.insert("s".into(), Tensor::scalar(f32::NAN));
        c.put("param", &p);
        c.put("optim", &p);
        c
    }

    #[test]
    fn round_trip_keeps_every_bit() {
        let dir = tempfile::tempdir().unwrap();
        let path = Checkpoint::path(dir.path());
        let c = sample();
        c.save(&path).unwrap();
        let back = Checkpoint::load(&path).unwrap();
        assert_eq!(back.meta, c.meta);
        assert_eq!(back.tensors.len(), 4);
        for (k, t) in &c.tensors {
            let b = &back.tensors[k];
            assert_eq!(b.shape, t.shape);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&b.data), bits(&t.data), "{k}");
        }
        assert_eq!(back.group("param").len(), 2);
    }

    #[test]
    fn damaged_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = Checkpoint::path(dir.path());
        sample().save(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = format!("{:#}", Checkpoint::load(&path).unwrap_err());
        assert!(e.contains("cut short"), "{e}");
        std::fs::write(&path, b"not a checkpoint at all").unwrap();
        assert!(Checkpoint::load(&path).is_err());
        assert!(Checkpoint::load(&dir.path().join("missing.ckpt")).is_err());
    }
}
