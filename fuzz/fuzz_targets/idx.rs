//! The MNIST IDX dataset reader: an images file and a labels file (headers with arbitrary
//! counts and sizes, or raw bytes) in a folder, detected, opened and streamed to the end.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Header {
    magic_ok: bool,
    n: u32,
    h: u32,
    w: u32,
    small: bool,
}

#[derive(Arbitrary, Debug)]
struct Input {
    images_header: Option<Header>,
    images: Vec<u8>,
    labels_header: Option<(bool, u32)>,
    labels: Option<Vec<u8>>,
    /// Names the files so that the labels are found by name, or only by their magic.
    named: bool,
    pre: shrink_fuzz::Pre,
    batch: u8,
}

fuzz_target!(|input: Input| {
    shrink_fuzz::init();
    let dir = shrink_fuzz::scratch("idx");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch folder");
    let mut images = Vec::new();
    let (mut h, mut w) = (0, 0);
    if let Some(hd) = &input.images_header {
        let (n, hh, ww) = if hd.small {
            (hd.n % 40, hd.h % 12, hd.w % 12)
        } else {
            (hd.n, hd.h, hd.w)
        };
        (h, w) = (hh as usize, ww as usize);
        images.extend_from_slice(&(if hd.magic_ok { 0x803u32 } else { 0x801 }).to_be_bytes());
        for v in [n, hh, ww] {
            images.extend_from_slice(&v.to_be_bytes());
        }
    }
    images.extend_from_slice(&input.images);
    let (img_name, lbl_name) = if input.named {
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
    } else {
        ("a", "b")
    };
    std::fs::write(dir.join(img_name), &images).expect("write scratch file");
    if let Some(l) = &input.labels {
        let mut labels = Vec::new();
        if let Some((magic_ok, m)) = input.labels_header {
            labels.extend_from_slice(&(if magic_ok { 0x801u32 } else { 0x803 }).to_be_bytes());
            labels.extend_from_slice(&m.to_be_bytes());
        }
        labels.extend_from_slice(l);
        std::fs::write(dir.join(lbl_name), &labels).expect("write scratch file");
    }
    let samples = [[1, h, w], [1, 28, 28]];
    let batch = input.batch as usize % 70 + 1;
    shrink_fuzz::exercise_dataset(&dir, &input.pre, &samples, batch);
    shrink_fuzz::exercise_dataset(&dir.join(img_name), &input.pre, &samples[..1], batch);
});
