//! Labelled datasets streamed in batches: image folders, `.npz` archives and MNIST IDX files.

use serde::{Deserialize, Serialize};

/// How raw images become model inputs. Fields left unset are derived from the model's
/// input shape (size, channels) or take the usual defaults (scale to [0,1], no mean/std).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct Preprocess {
    /// Resize the shorter side to this many pixels before the center crop (image folders).
    #[arg(long)]
    pub resize: Option<u32>,
    /// Center-crop to HxW, e.g. `224` or `224x224` (default: the model's input size).
    #[arg(long, value_name = "HxW")]
    pub crop: Option<String>,
    /// Per-channel mean subtracted after scaling to [0,1], comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "M,..")]
    pub mean: Option<Vec<f32>>,
    /// Per-channel standard deviation divided after the mean, comma-separated.
    #[arg(long, value_delimiter = ',', value_name = "S,..")]
    pub std: Option<Vec<f32>>,
    /// Channel order of the model input: `rgb` (default) or `bgr`.
    #[arg(long, value_name = "ORDER")]
    pub channel_order: Option<ChannelOrder>,
    /// Use at most this many samples of the dataset.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    Rgb,
    Bgr,
}

mod idx;
mod images;
pub mod npy;

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::hint::HintExt;

/// A batch of samples: `x` is NCHW float32, `y` the labels when the dataset has them.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub x: Vec<f32>,
    /// Shape of `x`: `[n, c, h, w]`.
    pub shape: [usize; 4],
    pub y: Option<Vec<i64>>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.shape[0]
    }

    pub fn is_empty(&self) -> bool {
        self.shape[0] == 0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Npz,
    Idx,
    ImageFolder,
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Format::Npz => "npz",
            Format::Idx => "mnist-idx",
            Format::ImageFolder => "image-folder",
        })
    }
}

/// A labelled dataset on disk, opened for a model input of shape `[c, h, w]`.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub path: PathBuf,
    pub format: Format,
    /// Samples available after `--limit`.
    len: usize,
    sample: [usize; 3],
    pre: Preprocess,
    source: Source,
}

#[derive(Debug, Clone)]
enum Source {
    Npz(npy::NpzInfo),
    Idx(idx::IdxInfo),
    Images(images::ImageList),
}

impl Dataset {
    /// Opens `path` for a model whose input sample shape is `[c, h, w]`.
    pub fn open(path: &Path, pre: &Preprocess, sample: [usize; 3]) -> Result<Dataset> {
        ensure!(
            sample.iter().all(|&d| d > 0),
            "the model's input sample shape {sample:?} (C, H, W) has a zero dimension"
        );
        let meta = std::fs::metadata(path)
            .with_context(|| format!("cannot open dataset {}", path.display()))
            .hint("--data takes an image folder (one sub-folder per class), an .npz file with arrays `x` and `y`, or a folder with MNIST IDX files")?;
        let source = if meta.is_dir() {
            if let Some(info) = idx::detect(path)? {
                Source::Idx(info)
            } else {
                Source::Images(images::ImageList::scan(path)?)
            }
        } else if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
        {
            Source::Npz(npy::NpzInfo::open(path)?)
        } else if idx::is_idx_file(path)? {
            Source::Idx(idx::IdxInfo::from_images_file(path)?)
        } else {
            return Err(anyhow::anyhow!("{} is not a dataset shrink can read", path.display()))
                .hint("use an .npz file with arrays `x` and `y`, MNIST IDX files, or an image folder with one sub-folder per class");
        };
        let (format, n) = match &source {
            Source::Npz(i) => (Format::Npz, i.len),
            Source::Idx(i) => (Format::Idx, i.len),
            Source::Images(i) => (Format::ImageFolder, i.files.len()),
        };
        match &source {
            Source::Npz(i) => i.check_sample(sample, path)?,
            Source::Idx(i) => i.check_sample(sample, path)?,
            Source::Images(_) => {}
        }
        if let Some(m) = &pre.mean {
            ensure!(
                m.len() == sample[0] || m.len() == 1,
                "--mean has {} values but the model takes {} channels",
                m.len(),
                sample[0]
            );
        }
        if let Some(s) = &pre.std {
            ensure!(
                s.len() == sample[0] || s.len() == 1,
                "--std has {} values but the model takes {} channels",
                s.len(),
                sample[0]
            );
            ensure!(
                s.iter().all(|&v| v > 0.0 && v.is_finite()),
                "--std values must be positive"
            );
        }
        ensure!(n > 0, "dataset {} holds no samples", path.display());
        let len = pre.limit.map_or(n, |l| l.min(n));
        Ok(Dataset {
            path: path.to_path_buf(),
            format,
            len,
            sample,
            pre: pre.clone(),
            source,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn sample_shape(&self) -> [usize; 3] {
        self.sample
    }

    /// Streams the dataset in order, `batch` samples at a time (the last batch may be short).
    pub fn batches(&self, batch: usize) -> Result<Batches<'_>> {
        ensure!(batch > 0, "batch size must be at least 1");
        let reader = match &self.source {
            Source::Npz(i) => Reader::Npz(i.reader()?),
            Source::Idx(i) => Reader::Idx(i.reader()?),
            Source::Images(_) => Reader::Images(0),
        };
        Ok(Batches {
            ds: self,
            reader,
            next: 0,
            batch,
        })
    }

    /// Reads the whole dataset into memory (for training, which shuffles every epoch).
    pub fn load_all(&self) -> Result<Batch> {
        let mut it = self.batches(self.len.clamp(1, 4096))?;
        let [c, h, w] = self.sample;
        let bytes = crate::util::byte_size([self.len, c, h, w].map(|d| d as u64), 4);
        crate::util::ensure_fits_in_memory(bytes, || {
            format!(
                "dataset {} ({} samples of {c}x{h}x{w}, as float32)",
                self.path.display(),
                self.len
            )
        })?;
        let mut x = Vec::with_capacity(self.len * c * h * w);
        let mut y = Vec::with_capacity(self.len);
        let mut labelled = true;
        while let Some(b) = it.next_batch()? {
            x.extend_from_slice(&b.x);
            match b.y {
                Some(l) => y.extend(l),
                None => labelled = false,
            }
        }
        Ok(Batch {
            shape: [self.len, c, h, w],
            x,
            y: labelled.then_some(y),
        })
    }

    fn normalise(&self, x: &mut [f32], first_index: usize) -> Result<()> {
        let [c, h, w] = self.sample;
        let plane = h * w;
        for (i, v) in x.iter().enumerate() {
            if !v.is_finite() {
                let s = first_index + i / (c * plane);
                bail!(
                    "sample {s} of {} contains {v}; datasets must hold finite values",
                    self.path.display()
                );
            }
        }
        if self.pre.channel_order == Some(ChannelOrder::Bgr) && c == 3 {
            for s in x.chunks_mut(c * plane) {
                let (r, rest) = s.split_at_mut(plane);
                r.swap_with_slice(&mut rest[plane..2 * plane]);
            }
        }
        let pick = |v: &Option<Vec<f32>>, ch: usize, default: f32| match v {
            Some(m) if m.len() == 1 => m[0],
            Some(m) => m[ch],
            None => default,
        };
        if self.pre.mean.is_some() || self.pre.std.is_some() {
            for s in x.chunks_mut(c * plane) {
                for ch in 0..c {
                    let (m, sd) = (pick(&self.pre.mean, ch, 0.0), pick(&self.pre.std, ch, 1.0));
                    for v in &mut s[ch * plane..(ch + 1) * plane] {
                        *v = (*v - m) / sd;
                    }
                }
            }
        }
        Ok(())
    }
}

enum Reader {
    Npz(npy::NpzReader),
    Idx(idx::IdxReader),
    Images(usize),
}

/// Sequential batches over a [`Dataset`].
pub struct Batches<'a> {
    ds: &'a Dataset,
    reader: Reader,
    next: usize,
    batch: usize,
}

impl Batches<'_> {
    pub fn next_batch(&mut self) -> Result<Option<Batch>> {
        let n = self.batch.min(self.ds.len - self.next);
        if n == 0 {
            return Ok(None);
        }
        let [c, h, w] = self.ds.sample;
        let (mut x, y) = match (&mut self.reader, &self.ds.source) {
            (Reader::Npz(r), _) => r.read(n)?,
            (Reader::Idx(r), _) => r.read(n)?,
            (Reader::Images(pos), Source::Images(list)) => {
                let out = list.read(*pos, n, self.ds.sample, &self.ds.pre)?;
                *pos += n;
                out
            }
            _ => unreachable!("reader matches its source"),
        };
        self.ds.normalise(&mut x, self.next)?;
        self.next += n;
        Ok(Some(Batch {
            x,
            shape: [n, c, h, w],
            y,
        }))
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        self.next_batch().transpose()
    }
}

impl Dataset {
    /// `n` distinct sample indices drawn with `seed` (all of them, in order, when `n >= len`).
    pub fn sample_indices(&self, n: usize, seed: u64) -> Vec<usize> {
        use rand::seq::index::sample;
        use rand::SeedableRng;
        if n >= self.len {
            return (0..self.len).collect();
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut v = sample(&mut rng, self.len, n).into_vec();
        v.sort_unstable();
        v
    }

    /// Streams only the samples at `indices` (ascending), in batches of `batch`; memory stays
    /// one read batch plus one output batch whatever the dataset's size.
    pub fn for_each_subset_batch(
        &self,
        indices: &[usize],
        batch: usize,
        mut f: impl FnMut(Batch) -> Result<()>,
    ) -> Result<()> {
        ensure!(batch > 0, "batch size must be at least 1");
        ensure!(
            indices.windows(2).all(|w| w[0] < w[1]),
            "subset indices must be ascending"
        );
        let [c, h, w] = self.sample;
        let per = c * h * w;
        let mut want = indices.iter().copied().peekable();
        let (mut x, mut y) = (Vec::with_capacity(batch * per), Vec::with_capacity(batch));
        let mut labelled = true;
        let mut base = 0usize;
        let mut it = self.batches(256.min(self.len).max(1))?;
        while let Some(b) = it.next_batch()? {
            let n = b.shape[0];
            while let Some(&i) = want.peek() {
                if i >= base + n {
                    break;
                }
                let k = i - base;
                x.extend_from_slice(&b.x[k * per..(k + 1) * per]);
                match &b.y {
                    Some(l) => y.push(l[k]),
                    None => labelled = false,
                }
                want.next();
                if x.len() == batch * per {
                    let got = x.len() / per;
                    f(Batch {
                        x: std::mem::take(&mut x),
                        shape: [got, c, h, w],
                        y: labelled.then(|| std::mem::take(&mut y)),
                    })?;
                    y.clear();
                }
            }
            base += n;
            if want.peek().is_none() {
                break;
            }
        }
        if !x.is_empty() {
            let got = x.len() / per;
            f(Batch {
                x,
                shape: [got, c, h, w],
                y: labelled.then_some(y),
            })?;
        }
        Ok(())
    }
}
