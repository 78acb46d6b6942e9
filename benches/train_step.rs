//! One SGD training step (forward in training mode, cross-entropy gradient, backward,
//! `p -= lr * g`) on the fixture CNNs, at 1 and 2 threads:
//!
//! - `student`: fixtures/student.onnx (Conv-BN-ReLU-MaxPool x2, Gemm), batch 64, 1x28x28;
//! - `mbv2_tiny`: fixtures/mbv2_tiny.onnx (MobileNetV2-style), batch 32, 3x32x32.
//!
//! Run with `cargo bench --bench train_step`; criterion reports samples/s as `thrpt`.
//! `benches/torch_train_step.py` times the same steps in PyTorch.

use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use shrink::engine::{Mode, Net, Tensor};
use shrink::onnx::Model;

struct Trainer {
    net: Net,
    x: Tensor,
    labels: Vec<usize>,
    rng: ChaCha8Rng,
}

impl Trainer {
    fn new(model: &str, shape: [usize; 4]) -> Trainer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures")
            .join(model);
        let net =
            Net::from_model(&Model::load(&path).expect("fixture model")).expect("supported model");
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let n: usize = shape.iter().product();
        let x = Tensor::new(
            shape.to_vec(),
            (0..n).map(|_| rng.random::<f32>()).collect(),
        )
        .expect("input");
        let labels = (0..shape[0]).map(|_| rng.random_range(0..10)).collect();
        Trainer {
            net,
            x,
            labels,
            rng,
        }
    }

    fn step(&mut self) {
        let fwd = self
            .net
            .forward(&self.x, Mode::Train, &mut self.rng)
            .expect("forward");
        let logits = fwd.output();
        let (n, k) = (logits.shape[0], logits.shape[1]);
        let mut d = Tensor::zeros(&logits.shape);
        for (i, row) in logits.data.chunks(k).enumerate() {
            let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let z: f32 = row.iter().map(|v| (v - mx).exp()).sum();
            for j in 0..k {
                let p = (row[j] - mx).exp() / z;
                d.data[i * k + j] = (p - (j == self.labels[i]) as u8 as f32) / n as f32;
            }
        }
        let grads = self
            .net
            .backward(&fwd, &[("logits", &d)])
            .expect("backward");
        drop(fwd);
        let params = self.net.params_mut();
        for (name, g) in grads.iter() {
            let p = params.get_mut(name).expect("parameter");
            for (w, gv) in p.data.iter_mut().zip(&g.data) {
                *w -= 0.01 * gv;
            }
        }
    }
}

fn train_step(c: &mut Criterion) {
    for (name, file, shape) in [
        ("student", "student.onnx", [64, 1, 28, 28]),
        ("mbv2_tiny", "mbv2_tiny.onnx", [32, 3, 32, 32]),
    ] {
        let mut group = c.benchmark_group(name);
        group.throughput(Throughput::Elements(shape[0] as u64));
        group.sample_size(30);
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let mut t = Trainer::new(file, shape);
            // The step runs inside the pool, so kernels and GEMM see `threads` threads.
            pool.install(|| {
                for _ in 0..5 {
                    t.step();
                }
            });
            group.bench_function(format!("{threads}_threads"), |b| {
                b.iter(|| pool.install(|| t.step()))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, train_step);
criterion_main!(benches);
