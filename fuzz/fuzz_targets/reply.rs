#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| evsd_proto::fuzzing::reply(data));
