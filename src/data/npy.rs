//! `.npz` archives (NumPy's zip of `.npy` arrays) read as a stream: arrays `x` and `y`.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::hint::HintExt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dtype {
    F32,
    F64,
    U8,
    I64,
    I32,
    I16,
    U16,
    I8,
}

impl Dtype {
    fn parse(descr: &str) -> Option<Dtype> {
        Some(match descr {
            "<f4" => Dtype::F32,
            "<f8" => Dtype::F64,
            "|u1" | "<u1" => Dtype::U8,
            "|i1" | "<i1" => Dtype::I8,
            "<i8" => Dtype::I64,
            "<i4" => Dtype::I32,
            "<i2" => Dtype::I16,
            "<u2" => Dtype::U16,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Dtype::F32 | Dtype::I32 => 4,
            Dtype::F64 | Dtype::I64 => 8,
            Dtype::I16 | Dtype::U16 => 2,
            Dtype::U8 | Dtype::I8 => 1,
        }
    }

    fn to_f64(self, b: &[u8]) -> f64 {
        match self {
            Dtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Dtype::F64 => f64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
            Dtype::U8 => b[0] as f64,
            Dtype::I8 => b[0] as i8 as f64,
            Dtype::I64 => i64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f64,
            Dtype::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Dtype::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            Dtype::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
        }
    }
}

/// Parsed `.npy` header.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyHeader {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub header_bytes: usize,
}

/// Reads an `.npy` header from the start of `r`.
pub fn read_header(r: &mut impl Read) -> Result<NpyHeader> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .context("the array is truncated (no .npy header)")?;
    ensure!(
        &magic[..6] == b"\x93NUMPY",
        "the array is not in .npy format (bad magic)"
    );
    let (len, pre) = match magic[6] {
        1 => {
            let mut b = [0u8; 2];
            r.read_exact(&mut b)?;
            (u16::from_le_bytes(b) as usize, 10)
        }
        2 | 3 => {
            let mut b = [0u8; 4];
            r.read_exact(&mut b)?;
            (u32::from_le_bytes(b) as usize, 12)
        }
        v => bail!(".npy format version {v} is not supported"),
    };
    ensure!(
        len <= 1 << 20,
        ".npy header of {len} bytes is implausibly large"
    );
    let mut h = vec![0u8; len];
    r.read_exact(&mut h)
        .context("the .npy header is truncated")?;
    let h = String::from_utf8_lossy(&h);
    let field = |key: &str| -> Result<String> {
        let k = format!("'{key}':");
        let start = h
            .find(&k)
            .with_context(|| format!(".npy header lacks `{key}`"))?
            + k.len();
        Ok(h[start..].trim_start().to_string())
    };
    let descr = field("descr")?;
    let descr = descr
        .trim_start_matches('\'')
        .split('\'')
        .next()
        .unwrap_or_default()
        .to_string();
    let dtype = Dtype::parse(&descr).with_context(|| {
        format!("array dtype `{descr}` is not supported; use float32, uint8 or an integer type")
    })?;
    ensure!(
        field("fortran_order")?.starts_with("False"),
        "Fortran-ordered arrays are not supported; save with np.ascontiguousarray"
    );
    let shape_s = field("shape")?;
    let inner = shape_s
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .context("cannot parse the .npy shape")?;
    let shape = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .with_context(|| format!("bad dimension `{s}` in .npy shape"))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(NpyHeader {
        dtype,
        shape,
        header_bytes: pre + len,
    })
}

/// Layout of `x` as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    Nchw,
    Nhwc,
    Nhw,
}

#[derive(Debug, Clone)]
pub struct NpzInfo {
    path: PathBuf,
    x: Entry,
    header: NpyHeader,
    layout: Layout,
    /// Scale applied to integer pixels (1/255 for uint8).
    scale: f32,
    pub len: usize,
    labels: Option<Vec<i64>>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    data_start: u64,
    compressed_size: u64,
    /// Uncompressed size as the archive states it: an upper bound on what an array may claim.
    size: u64,
    deflated: bool,
}

fn entry(archive: &mut zip::ZipArchive<File>, name: &str) -> Result<Option<Entry>> {
    let f = match archive.by_name(name) {
        Ok(f) => f,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("cannot read `{name}` in the archive")),
    };
    let deflated = match f.compression() {
        zip::CompressionMethod::Stored => false,
        zip::CompressionMethod::Deflated => true,
        other => bail!("`{name}` is compressed with {other}; use np.savez or np.savez_compressed"),
    };
    Ok(Some(Entry {
        data_start: f.data_start(),
        compressed_size: f.compressed_size(),
        size: f.size(),
        deflated,
    }))
}

fn open_entry(path: &Path, e: Entry) -> Result<Box<dyn Read + Send>> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    f.seek(SeekFrom::Start(e.data_start))?;
    let raw = BufReader::with_capacity(1 << 16, f.take(e.compressed_size));
    Ok(if e.deflated {
        Box::new(BufReader::new(flate2::read::DeflateDecoder::new(raw)))
    } else {
        Box::new(raw)
    })
}

/// Checks that an array's declared shape fits in what its archive entry holds, before any
/// buffer of that size is allocated; returns the data size in bytes.
fn check_claim(h: &NpyHeader, e: &Entry, name: &str, path: &Path) -> Result<u64> {
    let bytes = crate::util::byte_size(h.shape.iter().map(|&d| d as u64), h.dtype.size() as u64);
    let have = e.size.saturating_sub(h.header_bytes as u64);
    match bytes {
        Some(b) if b <= have => Ok(b),
        _ => Err(anyhow::anyhow!(
            "array `{name}` in {} declares shape {:?} ({} bytes) but the archive holds {have} bytes of data for it",
            path.display(),
            h.shape,
            bytes.map_or("more than 2^64".to_string(), |b| b.to_string())
        ))
        .hint("the file is truncated or corrupt; save it again with np.savez"),
    }
}

impl NpzInfo {
    pub fn open(path: &Path) -> Result<NpzInfo> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut archive = zip::ZipArchive::new(file)
            .with_context(|| format!("{} is not a valid .npz (zip) archive", path.display()))?;
        let x = entry(&mut archive, "x.npy")?
            .with_context(|| format!("{} has no array `x`", path.display()))
            .hint("save inputs as `x` and labels as `y`: np.savez(path, x=images, y=labels)")?;
        let header = read_header(&mut open_entry(path, x)?)
            .with_context(|| format!("array `x` in {}", path.display()))?;
        check_claim(&header, &x, "x", path)?;
        let (layout, scale) = match (header.dtype, header.shape.len()) {
            (Dtype::F32, 4) => (Layout::Nchw, 1.0),
            (Dtype::F32, 3) => (Layout::Nhw, 1.0),
            (Dtype::U8, 3) => (Layout::Nhw, 1.0 / 255.0),
            (Dtype::U8, 4) if matches!(header.shape[3], 1 | 3) && !matches!(header.shape[1], 1 | 3) => (Layout::Nhwc, 1.0 / 255.0),
            (Dtype::U8, 4) => (Layout::Nchw, 1.0 / 255.0),
            (dt, r) => bail!(
                "array `x` in {} is {dt:?} with {r} dimensions; expected float32 NCHW, or uint8 NHW/NHWC",
                path.display()
            ),
        };
        let len = header.shape[0];
        let labels = match entry(&mut archive, "y.npy")? {
            None => None,
            Some(e) => {
                let mut r = open_entry(path, e)?;
                let h = read_header(&mut r)
                    .with_context(|| format!("array `y` in {}", path.display()))?;
                check_claim(&h, &e, "y", path)?;
                ensure!(
                    h.shape.len() == 1 && h.shape[0] == len,
                    "array `y` in {} has shape {:?}; expected ({len},) labels to match `x`",
                    path.display(),
                    h.shape
                );
                ensure!(
                    !matches!(h.dtype, Dtype::F32 | Dtype::F64),
                    "array `y` in {} holds floats; labels must be integers",
                    path.display()
                );
                let mut buf = vec![0u8; len * h.dtype.size()];
                r.read_exact(&mut buf)
                    .with_context(|| format!("array `y` in {} is truncated", path.display()))?;
                Some(
                    buf.chunks_exact(h.dtype.size())
                        .map(|b| h.dtype.to_f64(b) as i64)
                        .collect(),
                )
            }
        };
        Ok(NpzInfo {
            path: path.to_path_buf(),
            x,
            header,
            layout,
            scale,
            len,
            labels,
        })
    }

    fn stored_chw(&self) -> [usize; 3] {
        let s = &self.header.shape;
        match self.layout {
            Layout::Nchw => [s[1], s[2], s[3]],
            Layout::Nhwc => [s[3], s[1], s[2]],
            Layout::Nhw => [1, s[1], s[2]],
        }
    }

    pub fn check_sample(&self, want: [usize; 3], path: &Path) -> Result<()> {
        let have = self.stored_chw();
        ensure!(
            have == want,
            "{} holds samples of shape {have:?} (C, H, W) but the model takes {want:?}",
            path.display()
        );
        Ok(())
    }

    pub fn reader(&self) -> Result<NpzReader> {
        let mut r = open_entry(&self.path, self.x)?;
        let mut skip = vec![0u8; self.header.header_bytes];
        r.read_exact(&mut skip)?;
        Ok(NpzReader {
            info: self.clone(),
            r,
            pos: 0,
        })
    }
}

pub struct NpzReader {
    info: NpzInfo,
    r: Box<dyn Read + Send>,
    pos: usize,
}

impl NpzReader {
    /// Reads the next `n` samples as NCHW float32 (scaled to [0,1] when stored as uint8).
    pub fn read(&mut self, n: usize) -> Result<(Vec<f32>, Option<Vec<i64>>)> {
        let [c, h, w] = self.info.stored_chw();
        let per = c * h * w;
        let es = self.info.header.dtype.size();
        let mut buf = vec![0u8; n * per * es];
        self.r.read_exact(&mut buf).with_context(|| {
            format!(
                "{} is truncated: array `x` ends before sample {}",
                self.info.path.display(),
                self.pos + n
            )
        })?;
        let dt = self.info.header.dtype;
        let vals: Vec<f32> = match dt {
            Dtype::F32 => buf
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::U8 => buf.iter().map(|&b| b as f32 * self.info.scale).collect(),
            _ => buf
                .chunks_exact(es)
                .map(|b| dt.to_f64(b) as f32 * self.info.scale)
                .collect(),
        };
        let x = if self.info.layout == Layout::Nhwc {
            let mut out = vec![0f32; vals.len()];
            for s in 0..n {
                for y in 0..h {
                    for xx in 0..w {
                        for ch in 0..c {
                            out[s * per + ch * h * w + y * w + xx] =
                                vals[s * per + (y * w + xx) * c + ch];
                        }
                    }
                }
            }
            out
        } else {
            vals
        };
        let y = self
            .info
            .labels
            .as_ref()
            .map(|l| l[self.pos..self.pos + n].to_vec());
        self.pos += n;
        Ok((x, y))
    }
}

/// Reads one whole array of an `.npz` archive as f32 (for references and small inputs).
pub fn read_npz_array(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
    let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut archive = zip::ZipArchive::new(file)
        .with_context(|| format!("{} is not a valid .npz archive", path.display()))?;
    let e = entry(&mut archive, &format!("{name}.npy"))?
        .with_context(|| format!("{} has no array `{name}`", path.display()))?;
    let mut r = open_entry(path, e)?;
    let h = read_header(&mut r).with_context(|| format!("array `{name}` in {}", path.display()))?;
    let bytes = check_claim(&h, &e, name, path)?;
    crate::util::ensure_fits_in_memory(Some(bytes), || {
        format!("array `{name}` in {}", path.display())
    })?;
    let mut buf = vec![0u8; bytes as usize];
    r.read_exact(&mut buf)
        .with_context(|| format!("array `{name}` in {} is truncated", path.display()))?;
    Ok((
        h.shape,
        buf.chunks_exact(h.dtype.size())
            .map(|b| h.dtype.to_f64(b) as f32)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_v1_is_parsed() {
        let dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (64, 1, 28, 28), }";
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        b.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        b.extend_from_slice(dict.as_bytes());
        let h = read_header(&mut &b[..]).unwrap();
        assert_eq!(h.dtype, Dtype::F32);
        assert_eq!(h.shape, vec![64, 1, 28, 28]);
        assert_eq!(h.header_bytes, 10 + dict.len());
    }

    #[test]
    fn bad_magic_is_an_error() {
        assert!(read_header(&mut &b"PK\x03\x04garbage"[..]).is_err());
    }
}
