//! Training runs started at once in one process take turns and stay reproducible. In a process of its own:
//! unit tests on other threads reseed and draw from libtorch's process-wide generator outside any training
//! run, which the trainer's lock cannot keep out.
use lisa::data::Dataset;
use lisa::diffusion::{Objective, TrainingSample};
use lisa::train::step::{Batch, TaskLoss, TrainTask};
use lisa::train::trainer::{train, RunDir, TrainConfig};
use tch::{Device, Kind, Tensor};

/// A loss that is a multiple of one parameter.
struct ScaleTask {
    w: Tensor,
}

impl TrainTask for ScaleTask {
    fn loss(&self, _batch: &Batch, sample: &TrainingSample) -> lisa::Result<TaskLoss> {
        let loss = (&sample.x_t * &self.w).mse_loss(&sample.target, tch::Reduction::Mean);
        Ok(TaskLoss { loss, metrics: vec![("w".into(), self.w.detach().squeeze())] })
    }
}

#[test]
fn runs_started_at_once_in_one_process_take_turns_and_stay_reproducible() {
    // No generator use outside `train`: the data and the weight are built without drawing.
    let run = || -> f64 {
        let dir = tempfile::tempdir().unwrap();
        let w = Tensor::from_slice(&[0.0f32]).set_requires_grad(true);
        let task = ScaleTask { w: w.shallow_clone() };
        let data = Dataset {
            images: Tensor::linspace(-1.0, 1.0, 256, (Kind::Float, Device::Cpu)).view([16, 1, 4, 4]),
            labels: Tensor::zeros([16], (Kind::Int64, Device::Cpu)),
            num_classes: 1,
            class_names: vec!["x".into()],
            conditioning: None,
        };
        let c = TrainConfig {
            steps: 60,
            batch_size: 4,
            lr_warmup_steps: 0,
            learning_rate: 0.05,
            checkpointing_steps: 0,
            log_every: 1,
            ..Default::default()
        };
        let params = vec![("w".into(), w.shallow_clone())];
        train(&task, params, &data, &Objective::Flow, &c, &RunDir::plain(dir.path()), |_, _| Ok(())).unwrap();
        w.double_value(&[0])
    };
    let alone = run();
    let threads: Vec<_> = (0..3).map(|_| std::thread::spawn(run)).collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), alone, "a run that shared the process with others drew other noise");
    }
}
