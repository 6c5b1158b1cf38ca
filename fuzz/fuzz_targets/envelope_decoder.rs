//! Fuzz the queue file decoder (`spool::msgfile`): whatever bytes a queue file holds (torn
//! appends, foreign files, hand edits), reading it never panics, the trailer it finds ends
//! inside the file, and an envelope it returns survives being written back: appended as a
//! new trailer it reads back equal, and recovery then has nothing left to cut.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use postern::spool::msgfile;

/// One scratch file per fuzzing process (tmpfs when there is one: no disk wear).
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let shm = PathBuf::from("/dev/shm");
        let dir = if shm.is_dir() {
            shm
        } else {
            std::env::temp_dir()
        };
        dir.join(format!("postern-fuzz-envelope-{}", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    if std::fs::write(path, data).is_err() {
        return;
    }
    let Ok((env, end)) = msgfile::read(path, None) else {
        return;
    };
    assert!(end <= data.len() as u64, "trailer ends past the file");
    // Whether or not the message bytes the envelope claims are there, checking says so
    // without panicking.
    let _ = msgfile::check_size(path, &env);
    let trailer = msgfile::trailer(&env).expect("a decoded envelope encodes again");
    msgfile::append(path, &env, None).expect("append to a readable queue file");
    let (again, new_end) = msgfile::read(path, None).expect("read after append");
    assert_eq!(again, env, "envelope changed by a write-back");
    assert_eq!(
        new_end,
        end + trailer.len() as u64,
        "append did not cut the torn tail"
    );
    assert!(
        !msgfile::repair(path, None).expect("repair"),
        "repair found a torn tail after append"
    );
    let _ = std::fs::remove_file(path);
});
