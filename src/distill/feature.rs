//! Hint (feature) losses, as in FitNets (Romero et al. 2015): the mean squared error between
//! a named intermediate tensor of the teacher and one of the student. When their channel
//! counts differ, the student's tensor first goes through a learned 1x1 projection
//! (a per-pixel linear map with bias) that is trained with the student and then dropped:
//! it is not part of the written model.

use anyhow::{ensure, Result};
use rand::Rng;

use super::optim::Named;
use crate::engine::Tensor;

/// `TEACHER_TENSOR:STUDENT_TENSOR`, as given to `--hint`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HintSpec {
    pub teacher: String,
    pub student: String,
}

impl std::str::FromStr for HintSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<HintSpec, String> {
        match s.split_once(':') {
            Some((t, st)) if !t.is_empty() && !st.is_empty() => Ok(HintSpec {
                teacher: t.to_string(),
                student: st.to_string(),
            }),
            _ => Err(format!("`{s}` is not TEACHER_TENSOR:STUDENT_TENSOR")),
        }
    }
}

/// One hint term: its tensors and, when channels differ, the projection's parameters, stored
/// as `<prefix>.weight` `[teacher_c, student_c]` and `<prefix>.bias` `[teacher_c]`.
#[derive(Debug, Clone)]
pub struct Hint {
    pub spec: HintSpec,
    /// Name prefix of the projection parameters; None when the channel counts match.
    pub projection: Option<String>,
    pub student_channels: usize,
    pub teacher_channels: usize,
}

/// `[n, c, rest]` of an `[n, c, ...]` tensor (`rest` is 1 for `[n, c]`).
fn ncr(t: &Tensor, what: &str) -> Result<(usize, usize, usize)> {
    ensure!(
        t.shape.len() >= 2,
        "hint tensor `{what}` has shape {:?}; it needs a batch and a channel axis",
        t.shape
    );
    Ok((t.shape[0], t.shape[1], t.shape[2..].iter().product()))
}

impl Hint {
    /// Checks the two tensors' shapes (sample shapes `[c, ...]` from one forward pass each)
    /// and, when the channel counts differ, adds an initialised projection to `params`:
    /// uniform in ±1/√student_c for weight and bias, PyTorch's default for a 1x1 `Conv2d`.
    pub fn new(
        index: usize,
        spec: HintSpec,
        teacher: &[usize],
        student: &[usize],
        params: &mut Named,
        rng: &mut impl Rng,
    ) -> Result<Hint> {
        ensure!(
            teacher.len() == student.len() && teacher.len() >= 2 && teacher[2..] == student[2..],
            "hint {}:{}: the teacher tensor has shape {teacher:?} and the student tensor {student:?}; \
             they must agree except in the channel axis (1)",
            spec.teacher,
            spec.student
        );
        let (tc, sc) = (teacher[1], student[1]);
        let projection = (tc != sc).then(|| {
            let prefix = format!("hint{index}.projection");
            let bound = 1.0 / (sc as f64).sqrt();
            let mut uniform = |n: usize| {
                (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect::<Vec<_>>()
            };
            let w = uniform(tc * sc);
            let b = uniform(tc);
            params.insert(
                format!("{prefix}.weight"),
                Tensor {
                    shape: vec![tc, sc],
                    data: w,
                },
            );
            params.insert(
                format!("{prefix}.bias"),
                Tensor {
                    shape: vec![tc],
                    data: b,
                },
            );
            prefix
        });
        Ok(Hint {
            spec,
            projection,
            student_channels: sc,
            teacher_channels: tc,
        })
    }

    /// `weight · mean((P(s) - t)²)`; returns the loss, the gradient for the student tensor,
    /// and gradients for the projection parameters (added to `grads`).
    pub fn loss(
        &self,
        student: &Tensor,
        teacher: &Tensor,
        weight: f64,
        params: &Named,
        grads: &mut Named,
    ) -> Result<(f64, Tensor)> {
        let (n, sc, r) = ncr(student, &self.spec.student)?;
        let (tn, tc, tr) = ncr(teacher, &self.spec.teacher)?;
        ensure!(
            n == tn && r == tr && sc == self.student_channels && tc == self.teacher_channels,
            "hint {}:{}: tensors of shape {:?} and {:?} do not match the shapes seen when training started",
            self.spec.teacher,
            self.spec.student,
            teacher.shape,
            student.shape
        );
        let Some(prefix) = &self.projection else {
            let l = super::loss::mse(&student.data, &teacher.data)?;
            let g = l.grad.iter().map(|&v| (v as f64 * weight) as f32).collect();
            return Ok((
                l.loss * weight,
                Tensor {
                    shape: student.shape.clone(),
                    data: g,
                },
            ));
        };
        let (wn, bn) = (format!("{prefix}.weight"), format!("{prefix}.bias"));
        let (w, b) = match (params.get(&wn), params.get(&bn)) {
            (Some(w), Some(b)) => (&w.data, &b.data),
            _ => anyhow::bail!("the parameters of hint projection `{prefix}` are missing"),
        };
        let total = (n * tc * r) as f64;
        let mut loss = 0.0;
        // dP = weight·2(P - t)/numel, per output channel and pixel.
        let mut dp = vec![0f32; n * tc * r];
        for s in 0..n {
            let x = &student.data[s * sc * r..(s + 1) * sc * r];
            for o in 0..tc {
                for p in 0..r {
                    let mut v = b[o] as f64;
                    for i in 0..sc {
                        v += w[o * sc + i] as f64 * x[i * r + p] as f64;
                    }
                    let idx = (s * tc + o) * r + p;
                    let d = v - teacher.data[idx] as f64;
                    loss += d * d;
                    dp[idx] = (weight * 2.0 * d / total) as f32;
                }
            }
        }
        let mut dw = vec![0f64; tc * sc];
        let mut db = vec![0f64; tc];
        let mut ds = vec![0f32; student.data.len()];
        for s in 0..n {
            let x = &student.data[s * sc * r..(s + 1) * sc * r];
            for o in 0..tc {
                let g = &dp[(s * tc + o) * r..(s * tc + o + 1) * r];
                db[o] += g.iter().map(|&v| v as f64).sum::<f64>();
                for i in 0..sc {
                    let xi = &x[i * r..(i + 1) * r];
                    dw[o * sc + i] += g
                        .iter()
                        .zip(xi)
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum::<f64>();
                    let wi = w[o * sc + i];
                    for (d, &gv) in ds[s * sc * r + i * r..s * sc * r + (i + 1) * r]
                        .iter_mut()
                        .zip(g)
                    {
                        *d += wi * gv;
                    }
                }
            }
        }
        grads.insert(
            wn,
            Tensor {
                shape: vec![tc, sc],
                data: dw.iter().map(|&v| v as f32).collect(),
            },
        );
        grads.insert(
            bn,
            Tensor {
                shape: vec![tc],
                data: db.iter().map(|&v| v as f32).collect(),
            },
        );
        Ok((
            weight * loss / total,
            Tensor {
                shape: student.shape.clone(),
                data: ds,
            },
        ))
    }
}

#[cfg(test)]
// Reference values are pasted as PyTorch printed them.
#[allow(clippy::excessive_precision)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    // PyTorch 2.15:
    //
    //   s = torch.tensor(S).reshape(2, 3, 2, 2).requires_grad_()
    //   t = torch.tensor(T).reshape(2, 2, 2, 2)
    //   w = torch.tensor([[0.2, -0.1, 0.4], [0.3, 0.5, -0.2]], requires_grad=True)
    //   b = torch.tensor([0.1, -0.05], requires_grad=True)
    //   l = 0.7 * F.mse_loss(F.conv2d(s, w[:, :, None, None], b), t)
    //   l.backward(); print(l.item(), s.grad.flatten().tolist(), w.grad.flatten().tolist(), b.grad.tolist())
    const S: [f32; 24] = [
        0.5, -1.0, 2.0, 0.25, 1.5, 0.0, -0.5, 1.0, 0.1, 0.2, 0.3, -0.4, 1.0, 1.0, 0.0, -2.0, 0.3,
        -0.7, 0.9, 0.0, -1.0, 0.5, 0.5, 2.0,
    ];
    const T: [f32; 16] = [
        1.0, 0.0, 0.5, -0.5, 0.2, 0.4, 0.6, 0.8, -1.0, 2.0, 0.0, 1.0, 0.5, 0.5, -0.5, -0.5,
    ];
    const LOSS: f64 = 0.2947229743003845;
    const DS: [f32; 24] = [
        0.0006125028012320399,
        -0.02108750119805336,
        -0.00647500017657876,
        0.0017062482656911016,
        0.03552500158548355,
        -0.0343875028192997,
        -0.017237501218914986,
        -0.011943751946091652,
        -0.04287499934434891,
        0.013125001452863216,
        0.012250000610947609,
        0.01706250011920929,
        0.01785000041127205,
        -0.04340000078082085,
        0.024674998596310616,
        -0.023187503218650818,
        -0.003237498924136162,
        -0.01811249926686287,
        0.033162496984004974,
        -0.019687503576278687,
        0.028699999675154686,
        -0.037800002843141556,
        -0.006649998482316732,
        -0.007874998264014721,
    ];
    const DW: [f32; 6] = [
        0.03871874138712883,
        0.03421249985694885,
        -0.2344999760389328,
        0.07317189872264862,
        0.18987499177455902,
        -0.11156251281499863,
    ];
    const DB: [f32; 2] = [-0.1067500114440918, -0.09318751096725464];

    fn setup() -> (Hint, Named) {
        let mut params = Named::new();
        let spec = HintSpec {
            teacher: "t".into(),
            student: "s".into(),
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let h = Hint::new(0, spec, &[2, 2, 2, 2], &[2, 3, 2, 2], &mut params, &mut rng).unwrap();
        params.insert(
            "hint0.projection.weight".into(),
            Tensor::new(vec![2, 3], vec![0.2, -0.1, 0.4, 0.3, 0.5, -0.2]).unwrap(),
        );
        params.insert(
            "hint0.projection.bias".into(),
            Tensor::new(vec![2], vec![0.1, -0.05]).unwrap(),
        );
        (h, params)
    }

    #[test]
    fn projected_hint_matches_pytorch() {
        let (h, params) = setup();
        let s = Tensor::new(vec![2, 3, 2, 2], S.to_vec()).unwrap();
        let t = Tensor::new(vec![2, 2, 2, 2], T.to_vec()).unwrap();
        let mut grads = Named::new();
        let (l, ds) = h.loss(&s, &t, 0.7, &params, &mut grads).unwrap();
        assert!((l - LOSS).abs() < 1e-7, "{l}");
        let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-7);
        assert!(close(&ds.data, &DS), "{:?}", ds.data);
        assert!(close(&grads["hint0.projection.weight"].data, &DW));
        assert!(close(&grads["hint0.projection.bias"].data, &DB));
    }

    #[test]
    fn projected_hint_gradients_match_finite_differences() {
        let (h, params) = setup();
        let s = Tensor::new(vec![2, 3, 2, 2], S.to_vec()).unwrap();
        let t = Tensor::new(vec![2, 2, 2, 2], T.to_vec()).unwrap();
        let (_, ds) = h.loss(&s, &t, 0.7, &params, &mut Named::new()).unwrap();
        let eps = 1e-2f32;
        for i in 0..S.len() {
            let at = |d: f32| {
                let mut x = s.clone();
                x.data[i] += d;
                h.loss(&x, &t, 0.7, &params, &mut Named::new()).unwrap().0
            };
            let num = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            assert!(
                (num - ds.data[i] as f64).abs() < 1e-5,
                "ds[{i}]: {num} vs {}",
                ds.data[i]
            );
        }
    }

    #[test]
    fn equal_channels_need_no_projection_and_bad_shapes_are_refused() {
        let mut params = Named::new();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let spec: HintSpec = "a:b".parse().unwrap();
        let h = Hint::new(
            0,
            spec.clone(),
            &[1, 4, 3, 3],
            &[1, 4, 3, 3],
            &mut params,
            &mut rng,
        )
        .unwrap();
        assert!(h.projection.is_none() && params.is_empty());
        let e =
            Hint::new(0, spec, &[1, 4, 3, 3], &[1, 4, 6, 6], &mut params, &mut rng).unwrap_err();
        assert!(e.to_string().contains("a:b"), "{e}");
        assert!("nocolon".parse::<HintSpec>().is_err());
    }
}
