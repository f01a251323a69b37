#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| lisa::fuzzing::metadata_jsonl(data));
