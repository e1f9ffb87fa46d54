//! Raw MQTT bytes -> `Shared::process` (verify, route, map, report packing). Never panics.
//! Every payload is also verified with the verifier's fast paths (signed, authcrypt,
//! plaintext) on and off under all four requirements; the verdicts must be the same
//! (`check_fast_path`).
#![no_main]

use std::sync::OnceLock;

use didhub::pipeline::Shared;
use didhub_fuzz::{
    check_fast_path, identity, run_one, shared, shared_slow, DEVICE_KEY_IDENTITY_JSON,
};
use libfuzzer_sys::fuzz_target;

static SHARED: OnceLock<(Shared, Shared, String)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (shared, slow, registered) = SHARED.get_or_init(|| {
        (
            shared(),
            shared_slow(),
            identity(DEVICE_KEY_IDENTITY_JSON).did,
        )
    });
    run_one(shared, registered, data);
    check_fast_path(shared, slow, data);
});
