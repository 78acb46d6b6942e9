//! The loop on a tiny hand-written network: a linear classifier on mean-centred inputs whose
//! running mean plays the part of batch-norm state.

use super::*;
use crate::distill::net::LossFn;
use rand::Rng;

#[derive(Debug)]
struct Linear {
    params: Named,
    mean: Vec<f32>,
    d: usize,
    k: usize,
}

impl Linear {
    fn new(d: usize, k: usize) -> Linear {
        let mut params = Named::new();
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let w = (0..k * d).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        params.insert(
            "w".into(),
            Tensor {
                shape: vec![k, d],
                data: w,
            },
        );
        params.insert(
            "b".into(),
            Tensor {
                shape: vec![k],
                data: vec![0.0; k],
            },
        );
        Linear {
            params,
            mean: vec![0.0; d],
            d,
            k,
        }
    }

    fn logits(&self, xc: &[f32], n: usize) -> Tensor {
        let (w, b) = (&self.params["w"].data, &self.params["b"].data);
        let mut out = vec![0f32; n * self.k];
        for s in 0..n {
            for o in 0..self.k {
                out[s * self.k + o] = b[o]
                    + (0..self.d)
                        .map(|i| w[o * self.d + i] * xc[s * self.d + i])
                        .sum::<f32>();
            }
        }
        Tensor {
            shape: vec![n, self.k],
            data: out,
        }
    }

    fn centred(&self, x: &Tensor, mean: &[f32]) -> Tensor {
        let data = x
            .data
            .chunks(self.d)
            .flat_map(|r| r.iter().zip(mean).map(|(a, m)| a - m))
            .collect();
        Tensor {
            shape: vec![x.shape[0], self.d],
            data,
        }
    }
}

impl Network for Linear {
    fn params(&self) -> &Named {
        &self.params
    }
    fn params_mut(&mut self) -> &mut Named {
        &mut self.params
    }
    fn state(&self) -> Named {
        [(
            "mean".to_string(),
            Tensor {
                shape: vec![self.d],
                data: self.mean.clone(),
            },
        )]
        .into()
    }
    fn set_state(&mut self, state: &Named) -> Result<()> {
        self.mean = state.get("mean").context("no mean")?.data.clone();
        Ok(())
    }
    fn infer(&mut self, x: &Tensor, taps: &[String]) -> Result<(Tensor, Vec<Tensor>)> {
        let xc = self.centred(x, &self.mean);
        let l = self.logits(&xc.data, x.shape[0]);
        Ok((l, taps.iter().map(|_| xc.clone()).collect()))
    }
    fn train_step(
        &mut self,
        x: &Tensor,
        taps: &[String],
        _rng: &mut ChaCha8Rng,
        loss: &mut LossFn<'_>,
    ) -> Result<Named> {
        let n = x.shape[0];
        let mut mb = vec![0f32; self.d];
        for r in x.data.chunks(self.d) {
            for (m, v) in mb.iter_mut().zip(r) {
                *m += v / n as f32;
            }
        }
        for (m, b) in self.mean.iter_mut().zip(&mb) {
            *m = 0.9 * *m + 0.1 * b;
        }
        let xc = self.centred(x, &mb);
        let logits = self.logits(&xc.data, n);
        let tap_values: Vec<Tensor> = taps.iter().map(|_| xc.clone()).collect();
        let (g, _) = loss(&logits, &tap_values)?;
        let mut dw = vec![0f32; self.k * self.d];
        let mut db = vec![0f32; self.k];
        for s in 0..n {
            for o in 0..self.k {
                let go = g.data[s * self.k + o];
                db[o] += go;
                for i in 0..self.d {
                    dw[o * self.d + i] += go * xc.data[s * self.d + i];
                }
            }
        }
        let mut grads = Named::new();
        grads.insert(
            "w".into(),
            Tensor {
                shape: vec![self.k, self.d],
                data: dw,
            },
        );
        grads.insert(
            "b".into(),
            Tensor {
                shape: vec![self.k],
                data: db,
            },
        );
        Ok(grads)
    }
}

/// Three well-separated blobs in 4 dimensions (NCHW `[n, 1, 2, 2]`).
fn blobs(n: usize, seed: u64) -> Samples {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let centres = [
        [2.0f32, 0.0, 0.0, 1.0],
        [0.0, 2.0, 1.0, 0.0],
        [-1.0, -1.0, 2.0, 2.0],
    ];
    let mut x = Vec::new();
    let mut y = Vec::new();
    for i in 0..n {
        let k = i % 3;
        x.extend(
            centres[k]
                .iter()
                .map(|c| c + rng.random_range(-0.5f32..0.5)),
        );
        y.push(k as i64);
    }
    Samples::new(
        Tensor {
            shape: vec![n, 1, 2, 2],
            data: x,
        },
        y,
    )
    .unwrap()
}

fn config() -> FitConfig {
    FitConfig {
        epochs: 3,
        batch_size: 16,
        lr: 0.1,
        optimizer: OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 5e-4,
        },
        schedule: ScheduleKind::Cosine,
        warmup_epochs: 1,
        label_smoothing: 0.0,
        clip_grad_norm: None,
        augment: Vec::new(),
        seed: 5,
        kd: None,
        hints: Vec::new(),
        hint_weight: 1.0,
        checkpoint_dir: None,
        resume: false,
        stop_after: None,
        threads: 1,
    }
}

fn all() -> BTreeSet<String> {
    ["w".to_string(), "b".to_string()].into()
}

fn train(cfg: &FitConfig, teacher: Option<&mut dyn Teacher>) -> Result<(Linear, Fit)> {
    let mut net = Linear::new(4, 3);
    let (data, val) = (blobs(90, 1), blobs(30, 2));
    let fit = super::fit(
        &mut net,
        teacher,
        &data,
        Some(&val),
        cfg,
        &all(),
        "fp",
        &NoProgress,
        &mut |_| Ok(()),
    )?;
    Ok((net, fit))
}

fn bits(net: &Linear) -> Vec<u32> {
    net.params
        .values()
        .flat_map(|t| t.data.iter().map(|v| v.to_bits()))
        .chain(net.mean.iter().map(|v| v.to_bits()))
        .collect()
}

#[test]
fn training_learns_and_keeps_the_best_epoch() {
    let (mut net, fit) = train(&config(), None).unwrap();
    let best = fit.best.unwrap();
    assert!(best.val_acc > 0.9, "{best:?}");
    assert_eq!(fit.metrics.len(), 3);
    assert_eq!(fit.metrics[2]["step"], 18);
    assert_eq!(
        evaluate(&mut net, &blobs(30, 2), 7, &NoProgress).unwrap(),
        best.val_acc
    );
}

#[test]
fn same_seed_same_weights_other_seed_other_weights() {
    let mut cfg = config();
    cfg.augment = vec![Augment::Flip, Augment::Crop];
    let a = train(&cfg, None).unwrap().0;
    let b = train(&cfg, None).unwrap().0;
    assert_eq!(bits(&a), bits(&b));
    cfg.seed = 6;
    assert_ne!(bits(&a), bits(&train(&cfg, None).unwrap().0));
}

#[test]
fn resume_continues_bit_for_bit() {
    for opt in [
        OptimizerConfig::Sgd {
            momentum: 0.9,
            nesterov: false,
            weight_decay: 1e-3,
        },
        OptimizerConfig::Adamw { weight_decay: 0.01 },
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config();
        cfg.optimizer = opt;
        cfg.augment = vec![Augment::Flip, Augment::Shift];
        let (straight, fit_a) = train(&cfg, None).unwrap();
        cfg.checkpoint_dir = Some(dir.path().to_path_buf());
        cfg.stop_after = Some(1);
        let (_, first) = train(&cfg, None).unwrap();
        assert!(first.stopped_early && first.epochs_done == 1);
        cfg.stop_after = None;
        cfg.resume = true;
        let (resumed, fit_b) = train(&cfg, None).unwrap();
        assert_eq!(bits(&straight), bits(&resumed), "{opt:?}");
        assert_eq!(fit_a.best, fit_b.best);
        assert_eq!(fit_b.metrics.len(), 3);
        // A finished run resumes to the same final weights without training further.
        let (again, _) = train(&cfg, None).unwrap();
        assert_eq!(bits(&again), bits(&straight));
    }
}

#[test]
fn resume_with_other_settings_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.checkpoint_dir = Some(dir.path().to_path_buf());
    cfg.stop_after = Some(1);
    train(&cfg, None).unwrap();
    cfg.resume = true;
    let mut net = Linear::new(4, 3);
    let e = super::fit(
        &mut net,
        None,
        &blobs(90, 1),
        None,
        &cfg,
        &all(),
        "other",
        &NoProgress,
        &mut |_| Ok(()),
    )
    .unwrap_err();
    assert!(
        crate::hint::render(&e).contains("other settings"),
        "{}",
        crate::hint::render(&e)
    );
}

#[test]
fn divergence_names_the_step_and_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.lr = 1e30;
    cfg.warmup_epochs = 0;
    cfg.schedule = ScheduleKind::Constant;
    cfg.checkpoint_dir = Some(dir.path().to_path_buf());
    let e = train(&cfg, None).unwrap_err();
    let text = crate::hint::render(&e);
    assert!(
        text.contains("the loss is NaN at step 3 (epoch 1, batch 3 of 6)"),
        "{text}"
    );
    assert!(text.contains("no checkpoint was written yet"), "{text}");
    assert!(text.contains("hint: lower --lr"), "{text}");
}

#[test]
fn frozen_parameters_do_not_move() {
    let mut net = Linear::new(4, 3);
    let before = net.params["w"].clone();
    let keep: BTreeSet<String> = ["b".to_string()].into();
    let mut cfg = config();
    cfg.epochs = 1;
    super::fit(
        &mut net,
        None,
        &blobs(30, 1),
        None,
        &cfg,
        &keep,
        "fp",
        &NoProgress,
        &mut |_| Ok(()),
    )
    .unwrap();
    assert_eq!(net.params["w"], before);
    assert_ne!(net.params["b"].data, vec![0.0; 3]);
}

/// A fixed linear teacher that knows the blobs.
struct Oracle;

impl Teacher for Oracle {
    fn describe(&self) -> String {
        "oracle".into()
    }
    fn infer(&mut self, x: &Tensor, taps: &[String]) -> Result<(Tensor, Vec<Tensor>)> {
        let centres = [
            [2.0f32, 0.0, 0.0, 1.0],
            [0.0, 2.0, 1.0, 0.0],
            [-1.0, -1.0, 2.0, 2.0],
        ];
        let data = x
            .data
            .chunks(4)
            .flat_map(|r| {
                centres
                    .iter()
                    .map(move |c| -c.iter().zip(r).map(|(a, b)| (a - b) * (a - b)).sum::<f32>())
            })
            .collect();
        let feats = Tensor {
            shape: vec![x.shape[0], 4],
            data: x.data.clone(),
        };
        Ok((
            Tensor {
                shape: vec![x.shape[0], 3],
                data,
            },
            taps.iter().map(|_| feats.clone()).collect(),
        ))
    }
}

#[test]
fn distillation_with_cached_and_per_batch_teacher() {
    let mut cfg = config();
    cfg.kd = Some(KdConfig {
        temperature: 4.0,
        alpha: 0.9,
        label_smoothing: 0.0,
    });
    cfg.augment.clear();
    let (_, fit) = train(&cfg, Some(&mut Oracle)).unwrap();
    assert!(fit.best.unwrap().val_acc > 0.9);
    cfg.augment = vec![Augment::Shift];
    cfg.hints = vec!["f:f".parse().unwrap()];
    let (_, fit) = train(&cfg, Some(&mut Oracle)).unwrap();
    assert!(fit.best.unwrap().val_acc > 0.9);
}
