//! Raw MQTT bytes -> `Shared::process` (verify, route, map, report packing). Never panics.
#![no_main]

use std::sync::OnceLock;

use didhub::pipeline::Shared;
use didhub_fuzz::{identity, run_one, shared, DEVICE_KEY_IDENTITY_JSON};
use libfuzzer_sys::fuzz_target;

static SHARED: OnceLock<(Shared, String)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (shared, registered) =
        SHARED.get_or_init(|| (shared(), identity(DEVICE_KEY_IDENTITY_JSON).did));
    run_one(shared, registered, data);
});
