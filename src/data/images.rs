//! Image folders laid out one sub-folder per class, decoded with the `image` crate.

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use image::imageops::FilterType;

use super::Preprocess;

#[derive(Debug, Clone)]
pub struct ImageList {
    #[allow(dead_code)] // Reported by future `inspect --data`; kept with the files it names.
    pub classes: Vec<String>,
    /// (file, class index), classes in sorted order, files sorted within each class.
    pub files: Vec<(PathBuf, i64)>,
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg"))
}

impl ImageList {
    pub fn scan(dir: &Path) -> Result<ImageList> {
        let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("cannot list {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        classes.sort();
        ensure!(
            !classes.is_empty(),
            "{} has no class sub-folders; an image dataset holds one folder per class (e.g. 0/, 1/, ...)",
            dir.display()
        );
        let mut files = Vec::new();
        for (i, c) in classes.iter().enumerate() {
            let mut f: Vec<PathBuf> = std::fs::read_dir(c)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file() && is_image(p))
                .collect();
            f.sort();
            files.extend(f.into_iter().map(|p| (p, i as i64)));
        }
        ensure!(
            !files.is_empty(),
            "{} holds no PNG or JPEG images",
            dir.display()
        );
        let classes = classes
            .iter()
            .map(|c| {
                c.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            })
            .collect();
        Ok(ImageList { classes, files })
    }

    pub fn read(
        &self,
        start: usize,
        n: usize,
        sample: [usize; 3],
        pre: &Preprocess,
    ) -> Result<(Vec<f32>, Option<Vec<i64>>)> {
        let [c, h, w] = sample;
        let mut x = Vec::with_capacity(n * c * h * w);
        let mut y = Vec::with_capacity(n);
        for (path, label) in &self.files[start..start + n] {
            let img = image::open(path)
                .with_context(|| format!("cannot decode image {}", path.display()))?;
            let img = resize_and_crop(img, h, w, pre)?;
            match c {
                1 => {
                    let g = img.to_luma8();
                    x.extend(g.pixels().map(|p| p.0[0] as f32 / 255.0));
                }
                3 => {
                    let rgb = img.to_rgb8();
                    for ch in 0..3 {
                        x.extend(rgb.pixels().map(|p| p.0[ch] as f32 / 255.0));
                    }
                }
                other => anyhow::bail!(
                    "the model takes {other} channels; image folders give 1 (grayscale) or 3 (RGB)"
                ),
            }
            y.push(*label);
        }
        Ok((x, Some(y)))
    }
}

fn parse_crop(s: &str) -> Result<(u32, u32)> {
    let parts: Vec<&str> = s.split(['x', 'X']).collect();
    let nums: Vec<u32> = parts
        .iter()
        .map(|p| p.trim().parse::<u32>())
        .collect::<std::result::Result<_, _>>()
        .with_context(|| format!("--crop `{s}` must be N or HxW"))?;
    match nums.as_slice() {
        [n] => Ok((*n, *n)),
        [h, w] => Ok((*h, *w)),
        _ => anyhow::bail!("--crop `{s}` must be N or HxW"),
    }
}

fn resize_and_crop(
    img: image::DynamicImage,
    h: usize,
    w: usize,
    pre: &Preprocess,
) -> Result<image::DynamicImage> {
    let (ch, cw) = match &pre.crop {
        Some(c) => parse_crop(c)?,
        None => (h as u32, w as u32),
    };
    ensure!(
        (ch as usize, cw as usize) == (h, w),
        "--crop {ch}x{cw} differs from the model's input {h}x{w}"
    );
    let img = match pre.resize {
        Some(short) => {
            let (iw, ih) = (img.width(), img.height());
            let scale = short as f32 / iw.min(ih) as f32;
            img.resize_exact(
                ((iw as f32 * scale).round() as u32).max(cw),
                ((ih as f32 * scale).round() as u32).max(ch),
                FilterType::Triangle,
            )
        }
        None if img.width() < cw || img.height() < ch => img.resize_exact(
            cw.max(img.width()),
            ch.max(img.height()),
            FilterType::Triangle,
        ),
        None => img,
    };
    let x0 = (img.width() - cw) / 2;
    let y0 = (img.height() - ch) / 2;
    Ok(img.crop_imm(x0, y0, cw, ch))
}
