//! MNIST IDX files: `*images*idx3-ubyte` (N×H×W uint8) with `*labels*idx1-ubyte` beside it.

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};

const IMAGES_MAGIC: u32 = 0x0000_0803;
const LABELS_MAGIC: u32 = 0x0000_0801;

#[derive(Debug, Clone)]
pub struct IdxInfo {
    images: PathBuf,
    pub len: usize,
    h: usize,
    w: usize,
    labels: Option<Vec<i64>>,
}

fn read_u32(r: &mut impl Read) -> Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

/// Whether `path` starts with the IDX image magic.
pub fn is_idx_file(path: &Path) -> Result<bool> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    Ok(read_u32(&mut f).ok() == Some(IMAGES_MAGIC))
}

/// Looks for an IDX images file in a folder.
pub fn detect(dir: &Path) -> Result<Option<IdxInfo>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    for f in files {
        if is_idx_file(&f)? {
            return Ok(Some(IdxInfo::from_images_file(&f)?));
        }
    }
    Ok(None)
}

impl IdxInfo {
    pub fn from_images_file(images: &Path) -> Result<IdxInfo> {
        let mut f = BufReader::new(
            File::open(images).with_context(|| format!("cannot open {}", images.display()))?,
        );
        ensure!(
            read_u32(&mut f)? == IMAGES_MAGIC,
            "{} is not an IDX image file",
            images.display()
        );
        let n = read_u32(&mut f)? as usize;
        let h = read_u32(&mut f)? as usize;
        let w = read_u32(&mut f)? as usize;
        ensure!(
            h > 0 && w > 0,
            "{} declares images of {h}x{w} pixels",
            images.display()
        );
        let size = std::fs::metadata(images)?.len();
        let need = (n as u64)
            .saturating_mul(h as u64)
            .saturating_mul(w as u64)
            .saturating_add(16);
        ensure!(
            size >= need,
            "{} declares {n} images of {h}x{w} ({need} bytes) but has {size} bytes",
            images.display()
        );
        let labels = find_labels(images)?
            .map(|p| read_labels(&p, n))
            .transpose()?;
        Ok(IdxInfo {
            images: images.to_path_buf(),
            len: n,
            h,
            w,
            labels,
        })
    }

    pub fn check_sample(&self, want: [usize; 3], path: &Path) -> Result<()> {
        ensure!(
            want == [1, self.h, self.w],
            "{} holds {}x{} grayscale images but the model takes {want:?} (C, H, W)",
            path.display(),
            self.h,
            self.w
        );
        Ok(())
    }

    pub fn reader(&self) -> Result<IdxReader> {
        let mut f = BufReader::with_capacity(1 << 16, File::open(&self.images)?);
        let mut skip = [0u8; 16];
        f.read_exact(&mut skip)?;
        Ok(IdxReader {
            info: self.clone(),
            r: f,
            pos: 0,
        })
    }
}

fn find_labels(images: &Path) -> Result<Option<PathBuf>> {
    let dir = images.parent().unwrap_or(Path::new("."));
    let name = images
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let guess = dir.join(name.replace("images", "labels").replace("idx3", "idx1"));
    if guess != images && guess.is_file() {
        return Ok(Some(guess));
    }
    for e in std::fs::read_dir(dir)?.filter_map(|e| e.ok()) {
        let p = e.path();
        if p.is_file() {
            let mut f = File::open(&p)?;
            if read_u32(&mut f).ok() == Some(LABELS_MAGIC) {
                return Ok(Some(p));
            }
        }
    }
    Ok(None)
}

fn read_labels(path: &Path, n: usize) -> Result<Vec<i64>> {
    let mut f = BufReader::new(File::open(path)?);
    ensure!(
        read_u32(&mut f)? == LABELS_MAGIC,
        "{} is not an IDX label file",
        path.display()
    );
    let m = read_u32(&mut f)? as usize;
    ensure!(
        m == n,
        "{} has {m} labels but the images file has {n} images",
        path.display()
    );
    // The count comes from the file: check it against the file's size before allocating.
    let size = std::fs::metadata(path)?.len();
    ensure!(
        size >= 8 + n as u64,
        "{} declares {n} labels but has {} bytes of them",
        path.display(),
        size.saturating_sub(8)
    );
    let mut b = vec![0u8; n];
    f.read_exact(&mut b)
        .with_context(|| format!("{} is truncated", path.display()))?;
    Ok(b.into_iter().map(i64::from).collect())
}

pub struct IdxReader {
    info: IdxInfo,
    r: BufReader<File>,
    pos: usize,
}

impl IdxReader {
    pub fn read(&mut self, n: usize) -> Result<(Vec<f32>, Option<Vec<i64>>)> {
        let mut b = vec![0u8; n * self.info.h * self.info.w];
        self.r
            .read_exact(&mut b)
            .with_context(|| format!("{} is truncated", self.info.images.display()))?;
        let y = self
            .info
            .labels
            .as_ref()
            .map(|l| l[self.pos..self.pos + n].to_vec());
        self.pos += n;
        Ok((b.into_iter().map(|v| v as f32 / 255.0).collect(), y))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(n: u32, h: u32, w: u32, data: &[u8]) -> Vec<u8> {
        let mut b = IMAGES_MAGIC.to_be_bytes().to_vec();
        for v in [n, h, w] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/idx.rs`): a count times size that saturates
    /// at u64::MAX overflowed when the 16 header bytes were added.
    #[test]
    fn idx_size_claim_overflow_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("images-idx3-ubyte");
        std::fs::write(&p, images(u32::MAX, u32::MAX, u32::MAX, &[])).unwrap();
        let e = format!("{:#}", IdxInfo::from_images_file(&p).unwrap_err());
        assert!(e.contains("declares 4294967295 images"), "{e}");
    }

    #[test]
    fn idx_label_count_beyond_file_is_refused_before_allocating() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("images-idx3-ubyte");
        std::fs::write(&p, images(2, 1, 1, &[0, 0])).unwrap();
        let mut labels = LABELS_MAGIC.to_be_bytes().to_vec();
        labels.extend_from_slice(&2u32.to_be_bytes());
        labels.push(1);
        std::fs::write(dir.path().join("labels-idx1-ubyte"), labels).unwrap();
        let e = format!("{:#}", IdxInfo::from_images_file(&p).unwrap_err());
        assert!(e.contains("declares 2 labels but has 1 bytes"), "{e}");
    }
}
