//! The decoder on arbitrary input: the first byte picks the topic and the size limit, the rest is
//! the payload. The invariants (never a panic; a reading's payload is the input, its device id
//! non-empty and bounded, its content hash set iff it has no timestamp; over the limit is
//! `TooLarge`) live in `leasehold_decode::invariants`, shared with the corpus replay in `make test`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    leasehold_decode::invariants::fuzz_one(data);
});
