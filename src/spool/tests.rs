use super::*;
use crate::smtp::{MessageDraft, MessageSink};

fn envelope(sender: &str) -> Envelope {
    Envelope {
        version: ENVELOPE_VERSION,
        id: String::new(),
        received_at: now_secs(),
        sender: sender.into(),
        recipients: vec![Recipient {
            address: "to@example.com".into(),
            status: RcptStatus::Pending,
            last_reply: None,
        }],
        client_addr: "127.0.0.1:1234".into(),
        client_helo: "printer".into(),
        auth_user: None,
        listener: "local".into(),
        route: "default".into(),
        mailbox: sender.into(),
        size: 0,
        body_8bit: false,
        smtputf8: false,
        attempts: 0,
        next_attempt: None,
        last_error: None,
        hold_reason: None,
        auto_hold: false,
        graph: None,
    }
}

async fn queue_one(spool: &Spool, body: &[u8]) -> String {
    let mut d = spool.begin().await.unwrap();
    let id = d.id().to_string();
    d.write(body).await.unwrap();
    d.commit(envelope("a@example.com")).await.unwrap();
    id
}

#[tokio::test]
async fn commit_moves_to_incoming_with_envelope_and_notifies() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let mut rx = spool.take_new_messages().unwrap();
    let body = vec![b'x'; 200_000]; // larger than one write chunk
    let id = queue_one(&spool, &body).await;
    assert_eq!(rx.recv().await.unwrap(), id);
    assert_eq!(spool.find(&id), Some(State::Incoming));
    let env = spool.read_envelope(State::Incoming, &id).unwrap();
    assert_eq!(env.id, id);
    assert_eq!(env.size, 200_000);
    let mut stored = Vec::new();
    use std::io::Read;
    msgfile::open_message(&spool.msg_path(State::Incoming, &id), env.size)
        .unwrap()
        .read_to_end(&mut stored)
        .unwrap();
    assert_eq!(stored, body);
    // one file per message: the body, then the envelope trailer
    let raw = std::fs::read(spool.msg_path(State::Incoming, &id)).unwrap();
    assert!(raw.ends_with(b"POSTERN1\n") && raw.starts_with(&body));
    assert!(spool.ids(State::Tmp).unwrap().is_empty());
    // Mail is private to the service user, whatever the umask.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&spool.msg_path(State::Incoming, &id)), 0o600);
    assert_eq!(mode(&spool.state_dir(State::Incoming)), 0o700);
    assert_eq!(mode(&dir.path().join("journal/0000")), 0o600);
}

#[tokio::test]
async fn dropped_or_discarded_drafts_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let mut d = spool.begin().await.unwrap();
    d.write(b"half a message").await.unwrap();
    drop(d);
    let mut d = spool.begin().await.unwrap();
    d.write(b"another").await.unwrap();
    d.discard().await;
    assert!(list_names(&spool.state_dir(State::Tmp)).unwrap().is_empty());
    assert!(spool.list().unwrap().is_empty());
}

#[tokio::test]
async fn concurrent_commits_all_land() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let s = spool.clone();
        tasks.push(tokio::spawn(async move {
            queue_one(&s, format!("msg {i}").as_bytes()).await
        }));
    }
    let mut ids = Vec::new();
    for t in tasks {
        ids.push(t.await.unwrap());
    }
    ids.sort();
    assert_eq!(spool.ids(State::Incoming).unwrap(), ids);
}

#[tokio::test]
async fn second_daemon_cannot_take_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let _a = Spool::open_exclusive(dir.path()).unwrap();
    assert!(matches!(
        Spool::open_exclusive(dir.path()),
        Err(SpoolError::Locked { .. })
    ));
    assert!(Spool::open_shared(dir.path()).is_ok());
}

#[tokio::test]
async fn recovery_wipes_tmp_requeues_active_and_quarantines_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c);
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        a = queue_one(&spool, b"a").await;
        b = queue_one(&spool, b"b").await;
        c = queue_one(&spool, b"c").await;
        // Checkpointed, so the journal cannot repair what follows (see the journal tests).
        spool.checkpoint().unwrap();
        spool.move_msg(&a, State::Incoming, State::Active).unwrap();
        // c: its envelope trailer destroyed, as a disk error might leave it
        let p = spool.msg_path(State::Incoming, &c);
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(len - 30)
            .unwrap();
        // b: a torn envelope append, as a crash during a deferral leaves it: repaired, kept
        let p = spool.msg_path(State::Incoming, &b);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, b"{\"version\":1,\"id\":\"").unwrap();
        // an abandoned draft, as a crash mid-DATA leaves it
        std::fs::write(spool.state_dir(State::Tmp).join(new_id()), b"partial").unwrap();
        // junk
        std::fs::create_dir(spool.state_dir(State::Deferred).join("junk")).unwrap();
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let r = spool.recover().unwrap();
    assert_eq!(
        r,
        Recovery {
            drafts_removed: 1,
            requeued: 1,
            quarantined: 2,
            restored: 0,
            delivered_removed: 0,
            duplicates_removed: 0,
        }
    );
    assert_eq!(spool.find(&a), Some(State::Incoming));
    assert_eq!(spool.find(&b), Some(State::Incoming));
    assert_eq!(spool.find(&c), None);
    assert!(spool.msg_path(State::Corrupt, &c).is_file());
    assert_eq!(spool.read_envelope(State::Incoming, &b).unwrap().id, b);
    assert!(list_names(&spool.state_dir(State::Tmp)).unwrap().is_empty());
}

#[tokio::test]
async fn size_mismatch_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let id = queue_one(&spool, b"hello").await;
    spool.checkpoint().unwrap();
    // a trailer claiming more message bytes than the file holds
    let mut env = spool.read_envelope(State::Incoming, &id).unwrap();
    env.size = 1_000_000;
    std::fs::write(
        spool.msg_path(State::Incoming, &id),
        msgfile::trailer(&env).unwrap(),
    )
    .unwrap();
    assert_eq!(spool.recover().unwrap().quarantined, 1);
}

#[tokio::test]
async fn admin_operations() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let id = queue_one(&spool, b"x").await;
    spool.hold(&id, "held by admin").unwrap();
    assert_eq!(spool.find(&id), Some(State::Hold));
    assert_eq!(
        spool
            .read_envelope(State::Hold, &id)
            .unwrap()
            .hold_reason
            .as_deref(),
        Some("held by admin")
    );
    assert_eq!(spool.requeue(&id).unwrap(), State::Hold);
    assert_eq!(spool.find(&id), Some(State::Incoming));
    assert!(
        spool
            .read_envelope(State::Incoming, &id)
            .unwrap()
            .hold_reason
            .is_none()
    );
    assert!(matches!(
        spool.requeue(&id),
        Err(SpoolError::WrongState { .. })
    ));
    spool.move_msg(&id, State::Incoming, State::Active).unwrap();
    assert!(matches!(
        spool.delete(&id),
        Err(SpoolError::WrongState { .. })
    ));
    assert!(matches!(
        spool.hold(&id, "x"),
        Err(SpoolError::WrongState { .. })
    ));
    spool.move_msg(&id, State::Active, State::Deferred).unwrap();
    assert_eq!(spool.delete(&id).unwrap(), State::Deferred);
    assert_eq!(spool.find(&id), None);
    assert!(matches!(spool.delete(&id), Err(SpoolError::NotFound(_))));
    assert!(matches!(
        spool.delete("../../etc"),
        Err(SpoolError::NotFound(_))
    ));
    assert!(list_names(&spool.state_dir(State::Tmp)).unwrap().is_empty());
}

#[tokio::test]
async fn illegal_moves_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let id = queue_one(&spool, b"x").await;
    assert!(matches!(
        spool.move_msg(&id, State::Incoming, State::Failed),
        Err(SpoolError::WrongState { .. })
    ));
    // a move whose source vanished reports NotFound (someone else moved it first)
    assert!(matches!(
        spool.move_msg(&id, State::Deferred, State::Active),
        Err(SpoolError::NotFound(_))
    ));
}

#[test]
fn envelope_roundtrip_and_unknown_version() {
    let dir = tempfile::tempdir().unwrap();
    drop(Spool::open_exclusive(dir.path()).unwrap()); // creates the directories
    let spool = Spool::open_shared(dir.path()).unwrap();
    let mut env = envelope("a@example.com");
    env.id = new_id();
    env.size = 2;
    let mut bytes = b"hi".to_vec();
    bytes.extend(msgfile::trailer(&env).unwrap());
    std::fs::write(spool.msg_path(State::Deferred, &env.id), bytes).unwrap();
    env.attempts = 3;
    spool.write_envelope(State::Deferred, &env).unwrap();
    assert_eq!(spool.read_envelope(State::Deferred, &env.id).unwrap(), env);
    env.version = 99;
    spool.write_envelope(State::Deferred, &env).unwrap();
    let err = spool
        .read_envelope(State::Deferred, &env.id)
        .unwrap_err()
        .to_string();
    assert!(err.contains("version 99"), "{err}");
}

/// Queue files whose bytes a power loss took are written again from the journal; intact
/// ones are left alone, and a draft the crash caught between journal and rename is queued.
#[tokio::test]
async fn journal_restores_queue_files_a_crash_took() {
    let dir = tempfile::tempdir().unwrap();
    let (gone, zeroed, intact, renamed, medium, large);
    let medium_body = vec![b'm'; 300_000]; // spills to tmp/, still journaled
    let large_body = vec![b'L'; 1_500_000]; // too big for the journal: flushed the POSIX way
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        let mut rx = spool.take_new_messages().unwrap();
        gone = queue_one(&spool, b"Subject: gone\r\n\r\nbody\r\n").await;
        zeroed = queue_one(&spool, b"Subject: zeroed\r\n\r\nbody\r\n").await;
        intact = queue_one(&spool, b"Subject: intact\r\n\r\nbody\r\n").await;
        renamed = queue_one(&spool, b"Subject: renamed\r\n\r\nbody\r\n").await;
        medium = queue_one(&spool, &medium_body).await;
        large = queue_one(&spool, &large_body).await;
        for _ in 0..6 {
            rx.recv().await.unwrap();
        }
        // What a power loss can do to files that were never flushed:
        let p = |id: &str| spool.msg_path(State::Incoming, id);
        std::fs::remove_file(p(&gone)).unwrap();
        let len = std::fs::metadata(p(&zeroed)).unwrap().len() as usize;
        std::fs::write(p(&zeroed), vec![0u8; len]).unwrap();
        std::fs::rename(p(&renamed), spool.msg_path(State::Tmp, &renamed)).unwrap();
        std::fs::remove_file(p(&medium)).unwrap();
        // no checkpoint: the daemon died
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let r = spool.recover().unwrap();
    assert_eq!(r.restored, 4, "{r:?}");
    assert_eq!(r.quarantined, 0);
    for (id, body) in [
        (&gone, &b"Subject: gone\r\n\r\nbody\r\n"[..]),
        (&zeroed, b"Subject: zeroed\r\n\r\nbody\r\n"),
        (&intact, b"Subject: intact\r\n\r\nbody\r\n"),
        (&renamed, b"Subject: renamed\r\n\r\nbody\r\n"),
        (&medium, &medium_body),
        (&large, &large_body),
    ] {
        assert_eq!(spool.find(id), Some(State::Incoming), "{id}");
        let env = spool.read_envelope(State::Incoming, id).unwrap();
        let raw = std::fs::read(spool.msg_path(State::Incoming, id)).unwrap();
        assert_eq!(&raw[..env.size as usize], body, "{id}");
    }
    assert!(list_names(&spool.state_dir(State::Tmp)).unwrap().is_empty());
    // Recovery checkpointed: the journal owes nothing any more.
    drop(spool);
    std::fs::remove_file(dir.path().join("incoming").join(&gone)).unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    assert_eq!(spool.recover().unwrap().restored, 0);
    assert_eq!(spool.find(&gone), None);
}

/// Delivered messages (done records) and messages the admin deleted (tombstones) stay gone.
#[tokio::test]
async fn journal_does_not_bring_back_delivered_or_deleted_mail() {
    let dir = tempfile::tempdir().unwrap();
    let (delivered, deleted, kept);
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        delivered = queue_one(&spool, b"a\r\n").await;
        deleted = queue_one(&spool, b"b\r\n").await;
        kept = queue_one(&spool, b"c\r\n").await;
        spool.claim(&delivered, State::Incoming).unwrap();
        spool.remove_delivered(&delivered).unwrap();
        // `queue delete` runs in another process, without the journal.
        let admin = Spool::open_shared(dir.path()).unwrap();
        admin.delete(&deleted).unwrap();
        assert_eq!(
            list_names(&dir.path().join("journal/deleted")).unwrap(),
            vec![deleted.clone()]
        );
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let r = spool.recover().unwrap();
    assert_eq!(r.restored, 0, "{r:?}");
    assert_eq!(spool.find(&delivered), None);
    assert_eq!(spool.find(&deleted), None);
    assert_eq!(spool.find(&kept), Some(State::Incoming));
    // Tombstones are cleared once the journal is reset.
    assert!(
        list_names(&dir.path().join("journal/deleted"))
            .unwrap()
            .is_empty()
    );
}

/// A torn or stale tail of a segment ends the scan; the records before it still count, and
/// a checkpoint retires a segment so its records are never replayed.
#[tokio::test]
async fn journal_tail_garbage_and_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second);
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        first = queue_one(&spool, b"first\r\n").await;
        spool.checkpoint().unwrap();
        second = queue_one(&spool, b"second\r\n").await;
        // Right after `second`'s record (segment 0001: the checkpoint sealed 0000), a torn
        // write of a batch that was never acknowledged: a record head whose crc is wrong.
        use std::os::unix::fs::FileExt;
        let qlen = std::fs::metadata(spool.msg_path(State::Incoming, &second))
            .unwrap()
            .len();
        let end = 4096 + 24 + 16 + qlen;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.path().join("journal/0001"))
            .unwrap();
        let mut edge = [0u8; 2];
        f.read_exact_at(&mut edge, end - 1).unwrap();
        assert_eq!(edge, [b'\n', 0], "the record ends where the test thinks");
        let mut torn = b"PJR1\x01\x10\0\0\x05\0\0\0".to_vec();
        torn.extend_from_slice(&[0xA5; 300]);
        f.write_all_at(&torn, end).unwrap();
        std::fs::remove_file(spool.msg_path(State::Incoming, &first)).unwrap();
        std::fs::remove_file(spool.msg_path(State::Incoming, &second)).unwrap();
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let r = spool.recover().unwrap();
    // `first` was checkpointed before its file vanished (so this is an admin's doing, not a
    // crash's), `second` was still owed by the journal.
    assert_eq!(r.restored, 1, "{r:?}");
    assert_eq!(spool.find(&first), None);
    assert_eq!(spool.find(&second), Some(State::Incoming));
}

/// Until recovery ran, a journal with records of a previous run refuses new records.
#[tokio::test]
async fn journal_refuses_records_before_recovery() {
    let dir = tempfile::tempdir().unwrap();
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        queue_one(&spool, b"x\r\n").await;
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let mut d = spool.begin().await.unwrap();
    d.write(b"y\r\n").await.unwrap();
    assert!(d.commit(envelope("a@example.com")).await.is_err());
    spool.recover().unwrap();
    queue_one(&spool, b"z\r\n").await;
}

/// More than a segment's worth of mail: the journal rotates, the checkpoint retires what it
/// sealed, and every message is intact.
#[tokio::test]
async fn journal_rotates_and_checkpoints_a_full_segment() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let mut rx = spool.take_new_messages().unwrap();
    let mut ids = Vec::new();
    for i in 0..40u8 {
        ids.push((queue_one(&spool, &vec![b'a' + i % 26; 900_000]).await, i));
        rx.recv().await.unwrap();
    }
    spool.checkpoint().unwrap();
    let segments = list_names(&dir.path().join("journal"))
        .unwrap()
        .into_iter()
        .filter(|n| n.len() == 4)
        .count();
    assert!(segments >= 2, "{segments} segments");
    for (id, i) in &ids {
        let raw = std::fs::read(spool.msg_path(State::Incoming, id)).unwrap();
        assert!(raw.starts_with(&vec![b'a' + i % 26; 900_000]), "{id}");
    }
    drop(spool);
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let r = spool.recover().unwrap();
    assert_eq!((r.restored, r.quarantined), (0, 0), "{r:?}");
    assert_eq!(spool.ids(State::Incoming).unwrap().len(), 40);
}

/// Every byte drafts buffer comes from the shared budget (`limits.message_memory`), their
/// first chunk included: past it they spill to tmp/, or write straight through when nothing is
/// left, so memory stays within the budget however many clients send at once; both kinds
/// commit intact and every reservation is given back.
#[tokio::test]
async fn drafts_stay_within_the_memory_budget_and_spill_beyond_it() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let budget = 8 << 20;
    spool.set_message_memory(budget);
    let used = |s: &Spool| s.inner.draft_memory_used.load(Ordering::Relaxed);
    let body: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let mut drafts = Vec::new();
    for _ in 0..80 {
        let mut d = spool.begin().await.unwrap();
        // In pieces, as a session writes them.
        for piece in body.chunks(20_000) {
            d.write(piece).await.unwrap();
            assert!(used(&spool) <= budget, "{} > {budget}", used(&spool));
        }
        drafts.push(d);
    }
    // A journal-sized message in memory holds a whole record; 8 of them fill the budget.
    let record = super::journal::MAX_RECORD;
    let in_memory = (budget / record) as usize;
    let spilled = list_names(&spool.state_dir(State::Tmp)).unwrap().len();
    assert_eq!(spilled, 80 - in_memory, "drafts written to tmp/");
    assert_eq!(used(&spool), in_memory as u64 * record);
    // No memory at all: a new message still streams, straight to the file.
    spool.set_message_memory(0);
    let mut d = spool.begin().await.unwrap();
    d.write(b"Subject: tiny\r\n\r\n").await.unwrap();
    assert!(d.buf.capacity() == 0 && d.file.is_some());
    drafts.push(d);
    spool.set_message_memory(budget);
    let mut ids = Vec::new();
    for d in drafts {
        ids.push(d.id().to_string());
        d.commit(envelope("a@example.com")).await.unwrap();
    }
    for id in &ids[..80] {
        let raw = std::fs::read(spool.msg_path(State::Incoming, id)).unwrap();
        assert!(raw.starts_with(&body), "{id}");
    }
    let raw = std::fs::read(spool.msg_path(State::Incoming, &ids[80])).unwrap();
    assert!(raw.starts_with(b"Subject: tiny\r\n\r\n"));
    assert!(list_names(&spool.state_dir(State::Tmp)).unwrap().is_empty());
    assert_eq!(used(&spool), 0, "every reservation given back");
}

/// A delivered message's queue file is written over by the next message (same inode, no new
/// one), the new content is exact, and start-up wipes the pool, but never a second link to a
/// queued message that a power cut can leave there.
#[tokio::test]
async fn delivered_queue_files_are_recycled() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let free = dir.path().join("free");
    let (first, second);
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        first = queue_one(&spool, &vec![b'1'; 5000]).await;
        let ino = std::fs::metadata(spool.msg_path(State::Incoming, &first))
            .unwrap()
            .ino();
        spool.claim(&first, State::Incoming).unwrap();
        spool.remove_delivered(&first).unwrap();
        assert_eq!(spool.find(&first), None);
        assert_eq!(list_names(&free).unwrap(), vec![first.clone()]);
        second = queue_one(&spool, b"short\r\n").await;
        let p = spool.msg_path(State::Incoming, &second);
        assert_eq!(std::fs::metadata(&p).unwrap().ino(), ino, "inode reused");
        let raw = std::fs::read(&p).unwrap();
        assert!(raw.starts_with(b"short\r\n") && raw.ends_with(b"POSTERN1\n"));
        assert_eq!(
            spool.read_envelope(State::Incoming, &second).unwrap().size,
            7
        );
        assert!(list_names(&free).unwrap().is_empty());
        // What a power cut can leave: the pool's old name beside the queued one.
        std::fs::hard_link(&p, free.join("stale")).unwrap();
        std::fs::write(free.join("spare"), b"old mail").unwrap();
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    spool.recover().unwrap();
    assert_eq!(list_names(&free).unwrap(), vec!["stale".to_string()]);
    assert_eq!(spool.find(&second), Some(State::Incoming));
}

/// A power cut can undo the unflushed moves of a recycled queue file (delivered message →
/// `free/` → new message) while the new message's bytes, written over the same inode, reached
/// the disk and its truncation did not. Found by tests/it/powercut/: the old name came back
/// holding the new message's body followed by the old envelope and was delivered again, as
/// the old message, with the new one's body; the new name ended in the old envelope and went
/// to `corrupt/`, though acknowledged.
#[tokio::test]
async fn a_recycled_queue_file_back_under_its_old_name_is_neither_sent_nor_mistaken() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new);
    let new_body = b"Subject: new\r\n\r\nthe new message\r\n".to_vec();
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        old = queue_one(&spool, &vec![b'o'; 6000]).await;
        let old_bytes = std::fs::read(spool.msg_path(State::Incoming, &old)).unwrap();
        spool.claim(&old, State::Incoming).unwrap();
        spool.remove_delivered(&old).unwrap();
        new = queue_one(&spool, &new_body).await;
        let p = spool.msg_path(State::Incoming, &new);
        let mut mixed = std::fs::read(&p).unwrap();
        assert!(mixed.len() < old_bytes.len());
        mixed.extend_from_slice(&old_bytes[mixed.len()..]);
        std::fs::write(&p, &mixed).unwrap();
        std::fs::hard_link(&p, spool.msg_path(State::Active, &old)).unwrap();
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let r = spool.recover().unwrap();
    assert_eq!(
        spool.find(&old),
        None,
        "a delivered message came back: {r:?}"
    );
    assert_eq!(r.delivered_removed, 1);
    assert_eq!(r.quarantined, 0);
    assert_eq!(r.restored, 1);
    assert_eq!(spool.find(&new), Some(State::Incoming));
    let env = spool.read_envelope(State::Incoming, &new).unwrap();
    let raw = std::fs::read(spool.msg_path(State::Incoming, &new)).unwrap();
    assert_eq!(
        (env.id.as_str(), &raw[..env.size as usize]),
        (new.as_str(), &new_body[..])
    );
}

/// A pooled file is written over only by a batch whose journal flush began after it was
/// pooled, so the done record of the message it held is on disk first (see recycle.rs).
#[test]
fn pooled_files_wait_for_a_later_flush() {
    let dir = tempfile::tempdir().unwrap();
    let free = recycle::FreeFiles::new(dir.path(), unsafe { libc::geteuid() });
    std::fs::create_dir(dir.path().join("free")).unwrap();
    let a = dir.path().join("a");
    std::fs::write(&a, b"delivered").unwrap();
    let before = free.ticket();
    free.put(&a, "a").unwrap();
    let (tmp, to) = (dir.path().join("tmp-b"), dir.path().join("b"));
    free.write_as(b"new", &tmp, &to, before).unwrap();
    assert!(
        dir.path().join("free/a").exists(),
        "reused a file pooled after the ticket"
    );
    let (tmp, to) = (dir.path().join("tmp-c"), dir.path().join("c"));
    free.write_as(b"newer", &tmp, &to, free.ticket()).unwrap();
    assert!(!dir.path().join("free/a").exists());
    assert_eq!(std::fs::read(&to).unwrap(), b"newer");
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn mkfifo(p: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
}

/// A valid queue file for `id`, built outside any spool.
fn queue_file_bytes(id: &str) -> Vec<u8> {
    let mut env = envelope("forger@example.com");
    env.id = id.into();
    env.size = 7;
    let mut bytes = b"forged\n".to_vec();
    bytes.extend(msgfile::trailer(&env).unwrap());
    bytes
}

/// A recycled file in free/ that someone replaced with a symlink (or a hard link) to a file
/// outside the spool is never written through: the target keeps its bytes, the link is
/// removed, and the new message still lands intact.
#[tokio::test]
async fn recycled_files_are_never_written_through_a_link() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("passwd");
    std::fs::write(&target, b"root:x:0:0::/root:/bin/sh\n").unwrap();
    let spool = Spool::open_exclusive(dir.path().join("spool").as_path()).unwrap();
    spool.recover().unwrap();
    let free = spool.root().join("free");
    for link in ["symlink", "hardlink"] {
        let first = queue_one(&spool, b"first\r\n").await;
        spool.claim(&first, State::Incoming).unwrap();
        spool.remove_delivered(&first).unwrap();
        let pooled = free.join(&first);
        assert!(pooled.is_file());
        std::fs::remove_file(&pooled).unwrap();
        if link == "symlink" {
            std::os::unix::fs::symlink(&target, &pooled).unwrap();
        } else {
            std::fs::hard_link(&target, &pooled).unwrap();
        }
        let second = queue_one(&spool, b"second message\r\n").await;
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"root:x:0:0::/root:/bin/sh\n",
            "{link}: the target outside the spool is untouched"
        );
        assert!(
            std::fs::symlink_metadata(&pooled).is_err(),
            "{link}: the planted link is removed"
        );
        let raw = std::fs::read(spool.msg_path(State::Incoming, &second)).unwrap();
        assert!(raw.starts_with(b"second message\r\n"), "{link}");
        assert_eq!(
            spool.read_envelope(State::Incoming, &second).unwrap().id,
            second
        );
        spool.remove(&second, State::Incoming).unwrap();
    }
}

/// Files postern did not write in a queue directory (a symlink to a well-formed queue file
/// outside the spool, a FIFO, a directory) are never delivered: start-up recovery moves them to
/// corrupt/, without reading through the link or blocking on the FIFO.
#[tokio::test]
async fn links_fifos_and_directories_in_the_queue_go_to_corrupt_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (link, fifo, subdir) = (new_id(), new_id(), new_id());
    let forged = outside.path().join(&link);
    let forged_bytes = queue_file_bytes(&link);
    std::fs::write(&forged, &forged_bytes).unwrap();
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        spool.recover().unwrap();
        std::os::unix::fs::symlink(&forged, spool.msg_path(State::Incoming, &link)).unwrap();
        mkfifo(&spool.msg_path(State::Deferred, &fifo));
        std::fs::create_dir(spool.msg_path(State::Hold, &subdir)).unwrap();
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let r = spool.recover().unwrap();
    assert_eq!(r.quarantined, 3, "{r:?}");
    assert!(spool.list().unwrap().is_empty(), "nothing queued");
    let corrupt = list_names(&spool.state_dir(State::Corrupt)).unwrap();
    for id in [&link, &fifo, &subdir] {
        assert!(corrupt.contains(id), "{id} in corrupt/: {corrupt:?}");
    }
    assert!(
        std::fs::symlink_metadata(spool.msg_path(State::Corrupt, &link))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link itself was moved, not what it points to"
    );
    assert_eq!(std::fs::read(&forged).unwrap(), forged_bytes);
}

/// While the daemon runs, what appears in a queue directory is checked as the forwarder sees
/// it: listing sets aside what is not a regular file, reading refuses a symlink.
#[tokio::test]
async fn links_and_fifos_dropped_into_a_running_queue_are_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    spool.recover().unwrap();
    let good = queue_one(&spool, b"good\r\n").await;
    let (link, fifo) = (new_id(), new_id());
    let forged = outside.path().join(&link);
    std::fs::write(&forged, queue_file_bytes(&link)).unwrap();
    std::os::unix::fs::symlink(&forged, spool.msg_path(State::Incoming, &link)).unwrap();
    mkfifo(&spool.msg_path(State::Incoming, &fifo));
    // Admin commands list only what is there and move nothing.
    let admin = Spool::open_shared(dir.path()).unwrap();
    assert_eq!(admin.ids(State::Incoming).unwrap(), vec![good.clone()]);
    assert!(matches!(
        admin.read_envelope(State::Incoming, &link),
        Err(SpoolError::Untrusted { .. })
    ));
    assert!(
        spool
            .msg_path(State::Incoming, &link)
            .symlink_metadata()
            .is_ok()
    );
    // The daemon's listing moves both aside.
    assert_eq!(spool.ids(State::Incoming).unwrap(), vec![good.clone()]);
    let corrupt = list_names(&spool.state_dir(State::Corrupt)).unwrap();
    assert!(
        corrupt.contains(&link) && corrupt.contains(&fifo),
        "{corrupt:?}"
    );
    // A symlink the listing could not tell apart (some filesystems give no entry type) is
    // refused at reading, and moved aside then.
    let late = new_id();
    std::os::unix::fs::symlink(&forged, spool.msg_path(State::Deferred, &late)).unwrap();
    let err = spool.read_envelope(State::Deferred, &late).unwrap_err();
    assert!(
        matches!(err, SpoolError::Untrusted { .. }) && err.to_string().contains("symbolic link"),
        "{err}"
    );
    assert!(
        spool
            .msg_path(State::Corrupt, &late)
            .symlink_metadata()
            .is_ok()
    );
    assert_eq!(
        spool.read_envelope(State::Incoming, &good).unwrap().id,
        good
    );
}

/// A well-formed queue file owned by another user is never delivered: moved to corrupt/ at
/// start-up and when the running daemon reads it. Needs root to chown (CI runs as root).
#[tokio::test]
async fn queue_files_of_another_user_go_to_corrupt() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to give a file to another user (CI runs as root)");
        return;
    }
    let nobody = 65534;
    let dir = tempfile::tempdir().unwrap();
    let (at_start, at_runtime) = (new_id(), new_id());
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        spool.recover().unwrap();
        let p = spool.msg_path(State::Incoming, &at_start);
        std::fs::write(&p, queue_file_bytes(&at_start)).unwrap();
        std::os::unix::fs::chown(&p, Some(nobody), Some(nobody)).unwrap();
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    assert_eq!(spool.recover().unwrap().quarantined, 1);
    assert!(spool.msg_path(State::Corrupt, &at_start).is_file());
    let p = spool.msg_path(State::Incoming, &at_runtime);
    std::fs::write(&p, queue_file_bytes(&at_runtime)).unwrap();
    std::os::unix::fs::chown(&p, Some(nobody), Some(nobody)).unwrap();
    let err = spool
        .read_envelope(State::Incoming, &at_runtime)
        .unwrap_err();
    assert!(err.to_string().contains("uid 65534"), "{err}");
    assert_eq!(spool.find(&at_runtime), None);
    assert!(spool.msg_path(State::Corrupt, &at_runtime).is_file());
}

/// Admin commands create nothing: not a missing spool, not a missing state directory (run as
/// root, they would leave root-owned directories the daemon cannot use).
#[tokio::test]
async fn admin_handle_creates_no_directories() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    assert!(Spool::open_shared(&missing).is_err());
    assert!(!missing.exists());
    let id;
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        spool.recover().unwrap();
        id = queue_one(&spool, b"x\r\n").await;
    }
    for d in ["corrupt", "free", "failed"] {
        std::fs::remove_dir(dir.path().join(d)).unwrap();
    }
    let admin = Spool::open_shared(dir.path()).unwrap();
    assert_eq!(admin.list().unwrap().len(), 1);
    assert_eq!(admin.find(&id), Some(State::Incoming));
    admin.hold(&id, "test").unwrap();
    for d in ["corrupt", "free", "failed"] {
        assert!(
            !dir.path().join(d).exists(),
            "{d} created by an admin command"
        );
    }
}

/// Queue directories are listed without following a symlink: an incoming/ swapped for a link
/// to a directory of forged queue files yields an error, not the forgeries.
#[tokio::test]
async fn queue_directories_are_not_listed_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let forged = new_id();
    std::fs::write(outside.path().join(&forged), queue_file_bytes(&forged)).unwrap();
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    spool.recover().unwrap();
    let incoming = spool.state_dir(State::Incoming);
    std::fs::remove_dir(&incoming).unwrap();
    std::os::unix::fs::symlink(outside.path(), &incoming).unwrap();
    // (Paths through a swapped directory still resolve: the start-up trust check, which
    // refuses a symlink where a spool directory belongs, is what rules that out.)
    assert!(spool.ids(State::Incoming).is_err());
}

/// The lock file is 0600 however it was left (an older postern created it with the umask).
#[test]
fn lock_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let lock = dir.path().join("lock");
    std::fs::write(&lock, b"").unwrap();
    std::fs::set_permissions(&lock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let _spool = Spool::open_exclusive(dir.path()).unwrap();
    let mode = std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

/// A move a power cut left on both sides (the destination's directory flushed, the source's
/// not) is one message under two names: recovery keeps one, so the forwarder neither schedules
/// it twice nor skips the second name as already known (found by the power-cut test).
#[tokio::test]
async fn a_message_left_in_two_queue_directories_keeps_one_name() {
    let dir = tempfile::tempdir().unwrap();
    let (deferred_too, held_too);
    {
        let spool = Spool::open_exclusive(dir.path()).unwrap();
        deferred_too = queue_one(&spool, b"Subject: a\r\n\r\nx\r\n").await;
        held_too = queue_one(&spool, b"Subject: b\r\n\r\ny\r\n").await;
        spool.claim(&deferred_too, State::Incoming).unwrap();
        let active = spool.msg_path(State::Active, &deferred_too);
        std::fs::hard_link(&active, spool.msg_path(State::Deferred, &deferred_too)).unwrap();
        std::fs::hard_link(
            spool.msg_path(State::Incoming, &held_too),
            spool.msg_path(State::Hold, &held_too),
        )
        .unwrap();
    }
    let spool = Spool::open_exclusive(dir.path()).unwrap();
    let r = spool.recover().unwrap();
    assert_eq!(r.duplicates_removed, 2, "{r:?}");
    assert_eq!(r.quarantined, 0);
    let names = |id: &str| {
        State::QUEUED
            .into_iter()
            .filter(|s| spool.msg_path(*s, id).exists())
            .collect::<Vec<_>>()
    };
    // active/ was requeued into incoming/, which is kept over deferred/; hold/ over incoming/
    assert_eq!(names(&deferred_too), vec![State::Incoming]);
    assert_eq!(names(&held_too), vec![State::Hold]);
    assert_eq!(
        spool
            .read_envelope(State::Incoming, &deferred_too)
            .unwrap()
            .id,
        deferred_too
    );
}
