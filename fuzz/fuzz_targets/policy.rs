//! Policy text, any bytes: the parser, validator and compiler, and the
//! daemon's incremental engine, must each give a clean error or a policy.
//! The two paths must agree on whether the text is a valid policy.

#![no_main]

use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use policy::{Contents, Engine, SourceChange};

fuzz_target!(|data: &[u8]| {
    // The daemon reads policy files as UTF-8 text and refuses anything else
    // before parsing.
    let Ok(text) = std::str::from_utf8(data) else { return };
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let parsed = policy::parse_str("fuzz.yaml", text);
    if let Ok(policy) = &parsed {
        let _ = policy::warnings(policy);
        let compiled = policy::compile_at(policy, now);
        std::hint::black_box(compiled);
    }
    let mut engine = Engine::new();
    let change = |contents| vec![SourceChange { source: "fuzz.yaml".to_owned(), contents }];
    let applied = engine.apply(change(Contents::Text(text.to_owned())), now);
    assert_eq!(
        parsed.is_ok(),
        applied.is_ok(),
        "parse_str and the engine disagree: {:?} / {:?}",
        parsed.as_ref().err(),
        applied.as_ref().err()
    );
    if applied.is_ok() {
        engine.commit();
        // Taking the source away again is the incremental path's other half.
        engine.apply(change(Contents::Removed), now).expect("an empty policy is valid");
    }
});
