#![no_main]
use std::path::PathBuf;
use std::sync::OnceLock;

/// One scratch folder per fuzzing process, on the RAM disk when there is one.
fn scratch() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base =
            if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let dir = base.join(format!("lisa-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch folder");
        dir
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| lisa::fuzzing::checkpoint(data, scratch()));
