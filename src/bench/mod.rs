//! `bench`: accuracy, memory and latency of models on a backend, and its reports.

pub mod measure;
pub mod report;
