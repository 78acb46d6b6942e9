//! `bench`: accuracy, memory and latency of models on a backend, and its reports.

pub mod measure;
pub mod render;
pub mod report;
