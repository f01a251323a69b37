//! `lisa device-check` with the CPU standing in for the device. It compares two training runs bit for bit, so it
//! runs in a process of its own: the library's unit tests, run as threads of one process, reseed libtorch's global
//! random generator and change its thread count while they run.
use lisa::experiments::device_check::{default_config, device_check};
use lisa::models::MixedPrecision;

/// The whole check: f32 against f32 is exact; bf16 and fp16 stay within their tolerance; a non-CUDA `cuda` is
/// refused.
#[test]
fn the_check_passes_with_the_cpu_as_device() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = default_config(dir.path().to_path_buf()).unwrap();
    cfg.device = "cpu".into();
    cfg.data.max_examples = 256;
    cfg.train.steps = 3;
    cfg.train.batch_size = 4;
    cfg.fidelity.num_images = 4;
    cfg.final_eval.num_images = 8;
    cfg.final_eval.chunk = 8;
    let r = device_check(&cfg, &[MixedPrecision::Bf16, MixedPrecision::Fp16], true).unwrap();
    assert_eq!(r.runs.len(), 4);
    assert_eq!(r.runs[0].losses.len(), 3);
    assert_eq!(r.comparisons[0].max_relative_deviation, 0.0, "{}", r.table());
    assert!(r.comparisons[1].max_relative_deviation > 0.0, "bf16 ran in bf16: {}", r.table());
    assert!(r.passed(), "{}", r.table());
    assert!(dir.path().join("device-check.json").exists());
    if !tch::Cuda::is_available() {
        cfg.device = "cuda".into();
        assert!(device_check(&cfg, &[], true).is_err());
    }
}
