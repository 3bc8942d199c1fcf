//! Ids of files, batches and output lines. An id starts with the creation
//! time (milliseconds, hex), so ids sort as they were made: lists page by id.

use modelgate_proto::clock;

/// A new id with `prefix`: 12 hex digits of the time, then 12 random ones.
pub fn new_id(prefix: &str) -> String {
    let mut random = [0u8; 6];
    // Without the OS's randomness the clock's nanoseconds stand in; ids stay unique per process.
    if getrandom::fill(&mut random).is_err() {
        random.copy_from_slice(
            &std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
                .to_be_bytes()
                .repeat(2)[..6],
        );
    }
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{:012x}{hex}", clock::unix_millis() & 0xffff_ffff_ffff)
}

pub const FILE: &str = "file-";
pub const BATCH: &str = "batch_";
pub const LINE: &str = "batch_req_";
