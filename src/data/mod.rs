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
