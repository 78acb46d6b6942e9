//! The training loop: seeded shuffling, augmentation, forward/backward/step, validation,
//! best-on-validation weights, per-epoch metrics and checkpoints, and resumption.
//!
//! Everything random (shuffling, augmentation, hint projections, anything the network draws)
//! comes from one ChaCha8 stream seeded by `--seed`, used in a fixed order; its position is
//! saved in each checkpoint, so a resumed run draws exactly what the uninterrupted one would
//! have. Work inside one step may be spread over threads by the engine; the loop itself is
//! sequential.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use super::augment::{self, Augment};
use super::checkpoint::{Best, Checkpoint, Meta};
use super::feature::{Hint, HintSpec};
use super::loss::{self, KdConfig};
use super::net::{Network, Teacher};
use super::optim::{clip_grad_norm, grad_norm, Named, OptimizerConfig, OptimizerState};
use super::schedule::{Schedule, ScheduleKind};
use crate::engine::Tensor;
use crate::hint::HintExt;

/// Labelled samples held in memory: `x` is `[n, c, h, w]`, `y` has `n` labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Samples {
    pub x: Tensor,
    pub y: Vec<i64>,
}

impl Samples {
    pub fn new(x: Tensor, y: Vec<i64>) -> Result<Samples> {
        ensure!(
            x.shape.len() == 4,
            "samples must be NCHW, got shape {:?}",
            x.shape
        );
        ensure!(
            x.shape[0] == y.len(),
            "{} samples but {} labels",
            x.shape[0],
            y.len()
        );
        ensure!(!y.is_empty(), "no samples");
        Ok(Samples { x, y })
    }

    pub fn len(&self) -> usize {
        self.y.len()
    }

    pub fn is_empty(&self) -> bool {
        self.y.is_empty()
    }

    fn sample_len(&self) -> usize {
        self.x.shape[1..].iter().product()
    }

    /// The samples at `idx`, in that order.
    pub fn gather(&self, idx: &[usize]) -> (Tensor, Vec<i64>) {
        let s = self.sample_len();
        let mut data = Vec::with_capacity(idx.len() * s);
        for &i in idx {
            data.extend_from_slice(&self.x.data[i * s..(i + 1) * s]);
        }
        let mut shape = self.x.shape.clone();
        shape[0] = idx.len();
        (
            Tensor { shape, data },
            idx.iter().map(|&i| self.y[i]).collect(),
        )
    }
}

/// Settings of one training run (the command line and recipes fill it in).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FitConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleKind,
    pub warmup_epochs: usize,
    pub label_smoothing: f64,
    pub clip_grad_norm: Option<f64>,
    pub augment: Vec<Augment>,
    pub seed: u64,
    /// Temperature and alpha when distilling; None trains on labels alone.
    pub kd: Option<KdConfig>,
    pub hints: Vec<HintSpec>,
    pub hint_weight: f64,
    /// Where `last.ckpt` is written after each epoch.
    #[serde(skip)]
    pub checkpoint_dir: Option<PathBuf>,
    #[serde(skip)]
    pub resume: bool,
    /// Stop after this many epochs (the checkpoint then lets `--resume` continue).
    #[serde(skip)]
    pub stop_after: Option<usize>,
    /// Threads the engine uses, recorded in metrics and checkpoints.
    #[serde(skip)]
    pub threads: usize,
}

/// Progress of training, reported by the loop; the commands layer draws bars from it.
pub trait Progress {
    /// A new phase (an epoch, computing teacher outputs, validation) of `total` samples.
    fn phase(&self, label: &str, total: u64);
    fn advance(&self, samples: u64);
    /// Running figures of the current epoch.
    fn status(&self, loss: f64, acc: f64, samples_per_s: f64);
    fn finish(&self);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn status(&self, _: f64, _: f64, _: f64) {}
    fn finish(&self) {}
}

/// One line of the metrics log, written after each epoch.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub epochs: usize,
    /// Optimizer steps taken so far.
    pub step: u64,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    pub train_loss: f64,
    /// Top-1 accuracy on the (augmented) training batches, in training mode.
    pub train_acc: f64,
    pub val_acc: Option<f64>,
    pub best_val_acc: Option<f64>,
    pub best_epoch: Option<usize>,
    /// Largest gradient norm of the epoch (before clipping).
    pub max_grad_norm: f64,
    pub samples: usize,
    /// Training throughput (forward, backward, update and any per-batch teacher run;
    /// validation excluded).
    pub samples_per_s: f64,
    pub epoch_s: f64,
    pub threads: usize,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    /// The epoch whose weights the network now holds (the best on validation, or the last).
    pub best: Option<Best>,
    pub epochs_done: usize,
    /// True when `stop_after` ended the run before the last epoch.
    pub stopped_early: bool,
    /// Every epoch's metrics, including those of the run this one resumed.
    pub metrics: Vec<serde_json::Value>,
}

/// Top-1 accuracy of `net` (inference mode) on `data`.
pub fn evaluate(
    net: &mut dyn Network,
    data: &Samples,
    batch: usize,
    progress: &dyn Progress,
) -> Result<f64> {
    accuracy(|x| Ok(net.infer(x, &[])?.0), data, batch, progress)
}

/// Top-1 accuracy of a teacher on `data`.
pub fn evaluate_teacher(
    t: &mut dyn Teacher,
    data: &Samples,
    batch: usize,
    progress: &dyn Progress,
) -> Result<f64> {
    accuracy(|x| Ok(t.infer(x, &[])?.0), data, batch, progress)
}

fn accuracy(
    mut f: impl FnMut(&Tensor) -> Result<Tensor>,
    data: &Samples,
    batch: usize,
    progress: &dyn Progress,
) -> Result<f64> {
    let mut right = 0;
    for start in (0..data.len()).step_by(batch.max(1)) {
        let idx: Vec<usize> = (start..(start + batch).min(data.len())).collect();
        let (x, y) = data.gather(&idx);
        let out = f(&x)?;
        right += loss::correct(&out.data, classes(&out, idx.len())?, &y);
        progress.advance(idx.len() as u64);
    }
    Ok(right as f64 / data.len() as f64)
}

/// Classes per sample of a logits tensor holding `n` rows.
fn classes(logits: &Tensor, n: usize) -> Result<usize> {
    ensure!(
        logits.shape.first() == Some(&n) && n > 0 && logits.data.len().is_multiple_of(n),
        "the model output has shape {:?} for a batch of {n}; expected [{n}, classes]",
        logits.shape
    );
    Ok(logits.data.len() / n)
}

/// Runs the teacher over all of `data` once: its logits for every sample, in order.
fn teacher_logits(
    t: &mut dyn Teacher,
    data: &Samples,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Tensor> {
    progress.phase("teacher logits", data.len() as u64);
    let mut out = Vec::new();
    let mut k = 0;
    for start in (0..data.len()).step_by(batch) {
        let idx: Vec<usize> = (start..(start + batch).min(data.len())).collect();
        let (x, _) = data.gather(&idx);
        let l = t.infer(&x, &[])?.0;
        k = classes(&l, idx.len())?;
        out.extend_from_slice(&l.data);
        progress.advance(idx.len() as u64);
    }
    progress.finish();
    Ok(Tensor {
        shape: vec![data.len(), k],
        data: out,
    })
}

fn rows(t: &Tensor, idx: &[usize]) -> Tensor {
    let k = t.shape[1];
    let mut data = Vec::with_capacity(idx.len() * k);
    for &i in idx {
        data.extend_from_slice(&t.data[i * k..(i + 1) * k]);
    }
    Tensor {
        shape: vec![idx.len(), k],
        data,
    }
}

fn only(named: Named, keep: &BTreeSet<String>) -> Named {
    named
        .into_iter()
        .filter(|(k, _)| keep.contains(k))
        .collect()
}

/// Everything a checkpoint restores.
struct Position {
    epoch: usize,
    step: u64,
    rng: ChaCha8Rng,
    best: Option<Best>,
    best_weights: Option<(Named, Named)>,
    metrics: Vec<serde_json::Value>,
}

/// Trains `net` (only the parameters in `trainable`) on `data`, distilling from `teacher`
/// when `cfg.kd` is set. On return the network holds the best weights on `val` (or the
/// last weights without `val`). `on_epoch` receives the metrics history after each epoch.
#[allow(clippy::too_many_arguments)]
pub fn fit(
    net: &mut dyn Network,
    mut teacher: Option<&mut dyn Teacher>,
    data: &Samples,
    val: Option<&Samples>,
    cfg: &FitConfig,
    trainable: &BTreeSet<String>,
    fingerprint: &str,
    progress: &dyn Progress,
    on_epoch: &mut dyn FnMut(&[serde_json::Value]) -> Result<()>,
) -> Result<Fit> {
    ensure!(cfg.epochs > 0, "--epochs must be at least 1");
    ensure!(cfg.batch_size > 0, "--batch-size must be at least 1");
    ensure!(!trainable.is_empty(), "no parameter is left to train");
    ensure!(
        cfg.kd.is_none() || teacher.is_some(),
        "distillation needs a teacher"
    );
    ensure!(
        cfg.hints.is_empty() || cfg.kd.is_some(),
        "hint losses need a teacher"
    );
    let n = data.len();
    let steps_per_epoch = n.div_ceil(cfg.batch_size) as u64;
    let schedule = Schedule::new(
        cfg.schedule,
        cfg.lr,
        cfg.warmup_epochs as u64 * steps_per_epoch,
        cfg.epochs as u64 * steps_per_epoch,
    )
    .context("invalid learning-rate schedule")?;
    let mut opt = cfg.optimizer.build(cfg.lr)?;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);

    // Hint projections are initialised from the training RNG before anything else draws.
    let teacher_taps: Vec<String> = cfg.hints.iter().map(|h| h.teacher.clone()).collect();
    let student_taps: Vec<String> = cfg.hints.iter().map(|h| h.student.clone()).collect();
    let mut hint_params = Named::new();
    let mut hints = Vec::new();
    if !cfg.hints.is_empty() {
        let t = teacher
            .as_deref_mut()
            .context("hint losses need a teacher")?;
        let (x, _) = data.gather(&[0]);
        let (_, tt) = t
            .infer(&x, &teacher_taps)
            .context("cannot read the teacher's hint tensors")?;
        let (_, st) = net
            .infer(&x, &student_taps)
            .context("cannot read the student's hint tensors")?;
        for (i, spec) in cfg.hints.iter().enumerate() {
            hints.push(Hint::new(
                i,
                spec.clone(),
                &tt[i].shape,
                &st[i].shape,
                &mut hint_params,
                &mut rng,
            )?);
        }
    }

    let mut pos = Position {
        epoch: 0,
        step: 0,
        rng,
        best: None,
        best_weights: None,
        metrics: Vec::new(),
    };
    let ckpt_path = cfg.checkpoint_dir.as_deref().map(Checkpoint::path);
    if cfg.resume {
        let path = ckpt_path
            .as_deref()
            .context("--resume needs --checkpoint-dir")?;
        pos = restore(path, cfg, fingerprint, net, &mut hint_params, opt.as_mut())?;
        crate::printer::info(format!(
            "resuming after epoch {} of {} from {}",
            pos.epoch,
            cfg.epochs,
            path.display()
        ));
    }

    let cached = match (&mut teacher, cfg.augment.is_empty() && cfg.hints.is_empty()) {
        // A sample's teacher logits do not depend on the batch it is computed in (bit for bit
        // at usual batch sizes, to float rounding for tiny ones, where the engine takes other
        // kernels), so without augmentation one pass gives what every epoch would ask for.
        (Some(t), true) if pos.epoch < cfg.epochs => {
            Some(teacher_logits(&mut **t, data, 256, progress)?)
        }
        _ => None,
    };

    let mut stopped_early = false;
    while pos.epoch < cfg.epochs {
        if cfg.stop_after.is_some_and(|s| pos.epoch >= s) {
            stopped_early = true;
            break;
        }
        let epoch = pos.epoch + 1;
        progress.phase(&format!("epoch {epoch}/{}", cfg.epochs), n as u64);
        let started = Instant::now();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut pos.rng);
        let (mut loss_sum, mut correct, mut seen, mut max_norm, mut lr) =
            (0.0, 0usize, 0usize, 0f64, cfg.lr);
        for (b, idx) in order.chunks(cfg.batch_size).enumerate() {
            let (mut x, y) = data.gather(idx);
            let shape = [x.shape[0], x.shape[1], x.shape[2], x.shape[3]];
            augment::apply(&cfg.augment, &mut x.data, shape, &mut pos.rng);
            let (t_logits, t_taps) = match (&cached, &mut teacher) {
                (Some(c), _) => (Some(rows(c, idx)), Vec::new()),
                (None, Some(t)) if cfg.kd.is_some() => {
                    let (l, taps) = t
                        .infer(&x, &teacher_taps)
                        .context("the teacher failed on a training batch")?;
                    (Some(l), taps)
                }
                _ => (None, Vec::new()),
            };
            lr = schedule.lr(pos.step);
            opt.set_lr(lr);
            let mut hint_grads = Named::new();
            let (mut batch_loss, mut batch_correct) = (f64::NAN, 0usize);
            let mut loss_fn = |logits: &Tensor, taps: &[Tensor]| -> Result<(Tensor, Vec<Tensor>)> {
                let k = classes(logits, idx.len())?;
                let lg = match (&t_logits, &cfg.kd) {
                    (Some(t), Some(kd)) => {
                        ensure!(
                            t.data.len() == logits.data.len(),
                            "the teacher gives {} outputs per sample and the student {k}",
                            t.data.len() / idx.len()
                        );
                        loss::distillation(&logits.data, &t.data, k, &y, kd)?
                    }
                    _ => loss::cross_entropy(&logits.data, k, &y, cfg.label_smoothing)?,
                };
                batch_correct = loss::correct(&logits.data, k, &y);
                let mut total = lg.loss;
                let mut tap_grads = Vec::with_capacity(hints.len());
                for (i, h) in hints.iter().enumerate() {
                    let (l, g) = h.loss(
                        &taps[i],
                        &t_taps[i],
                        cfg.hint_weight,
                        &hint_params,
                        &mut hint_grads,
                    )?;
                    total += l;
                    tap_grads.push(g);
                }
                batch_loss = total;
                Ok((
                    Tensor {
                        shape: logits.shape.clone(),
                        data: lg.grad,
                    },
                    tap_grads,
                ))
            };
            let step = pos.step + 1;
            let result = net.train_step(&x, &student_taps, &mut pos.rng, &mut loss_fn);
            let where_ = || {
                format!(
                    "step {step} (epoch {epoch}, batch {} of {steps_per_epoch})",
                    b + 1
                )
            };
            // A failed step leaves `batch_loss` unset; only a finished one can have diverged.
            if result.is_ok() && !batch_loss.is_finite() {
                return Err(diverged(
                    &format!("the loss is {batch_loss} at {}", where_()),
                    ckpt_path.as_deref(),
                    pos.epoch,
                ));
            }
            let grads = result.with_context(|| format!("training failed at {}", where_()))?;
            let mut grads = only(grads, trainable);
            grads.extend(hint_grads);
            let norm = match cfg.clip_grad_norm {
                Some(max) => clip_grad_norm(&mut grads, max).unwrap_or(f64::NAN),
                None => grad_norm(&grads),
            };
            if !norm.is_finite() {
                return Err(diverged(
                    &format!("the gradient norm is {norm} at {}", where_()),
                    ckpt_path.as_deref(),
                    pos.epoch,
                ));
            }
            max_norm = max_norm.max(norm);
            opt.step(net.params_mut(), &grads)
                .with_context(|| format!("optimizer step {step}"))?;
            if !hint_params.is_empty() {
                opt.step(&mut hint_params, &grads)?;
            }
            pos.step = step;
            loss_sum += batch_loss * idx.len() as f64;
            correct += batch_correct;
            seen += idx.len();
            progress.advance(idx.len() as u64);
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            progress.status(
                loss_sum / seen as f64,
                correct as f64 / seen as f64,
                seen as f64 / secs,
            );
        }
        let train_s = started.elapsed().as_secs_f64().max(1e-9);
        progress.finish();

        let val_acc = match val {
            Some(v) => {
                progress.phase("validation", v.len() as u64);
                let a = evaluate(net, v, 256, progress)
                    .with_context(|| format!("validation after epoch {epoch}"))?;
                progress.finish();
                Some(a)
            }
            None => None,
        };
        if let Some(a) = val_acc {
            if pos.best.is_none_or(|b| a > b.val_acc) {
                pos.best = Some(Best { epoch, val_acc: a });
                pos.best_weights = Some((net.params().clone(), net.state()));
            }
        }
        let m = EpochMetrics {
            epoch,
            epochs: cfg.epochs,
            step: pos.step,
            lr,
            train_loss: loss_sum / n as f64,
            train_acc: correct as f64 / n as f64,
            val_acc,
            best_val_acc: pos.best.map(|b| b.val_acc),
            best_epoch: pos.best.map(|b| b.epoch),
            max_grad_norm: max_norm,
            samples: n,
            samples_per_s: n as f64 / train_s,
            epoch_s: started.elapsed().as_secs_f64(),
            threads: cfg.threads,
        };
        pos.metrics.push(serde_json::to_value(&m)?);
        pos.epoch = epoch;
        if let Some(path) = &ckpt_path {
            save(path, cfg, fingerprint, net, &hint_params, opt.state(), &pos)
                .with_context(|| format!("after epoch {epoch}"))?;
        }
        on_epoch(&pos.metrics)?;
    }

    if let Some((params, state)) = pos.best_weights.take() {
        *net.params_mut() = params;
        net.set_state(&state)?;
    }
    Ok(Fit {
        best: pos.best,
        epochs_done: pos.epoch,
        stopped_early,
        metrics: pos.metrics,
    })
}

fn diverged(what: &str, ckpt: Option<&std::path::Path>, epochs_done: usize) -> anyhow::Error {
    let last = match ckpt {
        Some(p) if epochs_done > 0 => format!(
            "the last good checkpoint is {} (after epoch {epochs_done})",
            p.display()
        ),
        Some(_) => "no checkpoint was written yet (the first epoch had not finished)".to_string(),
        None => "no checkpoint was kept (pass --checkpoint-dir to keep one after every epoch)"
            .to_string(),
    };
    let e: Result<()> = Err(anyhow!("training diverged: {what}; {last}"));
    e.hint("lower --lr, add --warmup-epochs or set --clip-grad-norm; continue from the checkpoint with --resume")
        .unwrap_err()
}

fn save(
    path: &std::path::Path,
    cfg: &FitConfig,
    fingerprint: &str,
    net: &dyn Network,
    hint_params: &Named,
    opt: OptimizerState,
    pos: &Position,
) -> Result<()> {
    let mut c = Checkpoint {
        meta: Meta {
            fingerprint: fingerprint.to_string(),
            epoch: pos.epoch,
            step: pos.step,
            seed: cfg.seed,
            rng_word_pos: pos.rng.get_word_pos().to_string(),
            best: pos.best,
            optimizer_steps: opt.steps,
            metrics: pos.metrics.clone(),
            threads: cfg.threads,
        },
        tensors: Named::new(),
    };
    c.put("param", net.params());
    c.put("state", &net.state());
    c.put("hint", hint_params);
    let buffers: Named = opt
        .buffers
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                Tensor {
                    shape: vec![v.len()],
                    data: v,
                },
            )
        })
        .collect();
    c.put("optim", &buffers);
    if let Some((p, s)) = &pos.best_weights {
        c.put("best.param", p);
        c.put("best.state", s);
    }
    c.save(path)
}

fn restore(
    path: &std::path::Path,
    cfg: &FitConfig,
    fingerprint: &str,
    net: &mut dyn Network,
    hint_params: &mut Named,
    opt: &mut dyn super::optim::Optimizer,
) -> Result<Position> {
    let c = Checkpoint::load(path)?;
    let m = &c.meta;
    if m.fingerprint != fingerprint {
        return Err(anyhow!(
            "checkpoint {} was written by a run with other settings, models or data",
            path.display()
        ))
        .hint("resume with exactly the options of the interrupted run (only --threads, --stop-after, --metrics and --out may change), or start again without --resume");
    }
    ensure!(
        m.epoch <= cfg.epochs,
        "the checkpoint is after epoch {} but the run has {} epochs",
        m.epoch,
        cfg.epochs
    );
    if m.threads != cfg.threads {
        crate::printer::warn(format!(
            "the checkpoint was written with --threads {} and this run uses {}; results may differ in the last bits from an uninterrupted run",
            m.threads, cfg.threads
        ));
    }
    let params = c.group("param");
    check_same(net.params(), &params, "parameters")?;
    *net.params_mut() = params;
    net.set_state(&c.group("state"))
        .context("cannot restore the batch-norm statistics")?;
    let hints = c.group("hint");
    check_same(hint_params, &hints, "hint projections")?;
    *hint_params = hints;
    let buffers = c
        .group("optim")
        .into_iter()
        .map(|(k, t)| (k, t.data))
        .collect();
    opt.load_state(OptimizerState {
        buffers,
        steps: m.optimizer_steps.clone(),
    })?;
    let word_pos: u128 = m.rng_word_pos.parse().context("bad RNG position")?;
    let mut rng = ChaCha8Rng::seed_from_u64(m.seed);
    rng.set_word_pos(word_pos);
    let best_weights = m
        .best
        .is_some()
        .then(|| (c.group("best.param"), c.group("best.state")));
    Ok(Position {
        epoch: m.epoch,
        step: m.step,
        rng,
        best: m.best,
        best_weights,
        metrics: m.metrics.clone(),
    })
}

/// The checkpoint must hold the same tensors (names and shapes) as the model being trained.
fn check_same(have: &Named, saved: &Named, what: &str) -> Result<()> {
    for (k, t) in have {
        match saved.get(k) {
            Some(s) if s.shape == t.shape => {}
            Some(s) => bail!(
                "checkpoint {what}: `{k}` has shape {:?}, the model {:?}",
                s.shape,
                t.shape
            ),
            None => bail!("checkpoint {what}: `{k}` is missing"),
        }
    }
    if let Some(k) = saved.keys().find(|k| !have.contains_key(*k)) {
        bail!("checkpoint {what}: `{k}` is not in the model");
    }
    Ok(())
}

#[cfg(test)]
mod tests;
