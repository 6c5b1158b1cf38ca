//! Group commit: one thread renames every ready draft from `tmp/` into `incoming/` and then
//! fsyncs both directories once for the whole batch. Sessions that commit while a batch is
//! being synced form the next batch, so under load one pair of directory fsyncs covers many
//! messages instead of one fsync chain per message in sequence.

use std::path::PathBuf;
use std::sync::mpsc;

use tokio::sync::oneshot;

use super::{SpoolError, durable};

struct Request {
    id: String,
    done: oneshot::Sender<Result<(), SpoolError>>,
}

/// Handle to the committer thread.
pub(super) struct Committer {
    tx: mpsc::Sender<Request>,
}

impl Committer {
    /// Start the committer thread for the spool at `root`.
    pub(super) fn start(root: PathBuf) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("spool-commit".into())
            .spawn(move || run(root, rx))?;
        Ok(Self { tx })
    }

    /// Move `tmp/<id>` into `incoming/` durably; returns once it is on disk.
    pub(super) async fn commit(&self, id: String) -> Result<(), SpoolError> {
        let (done, rx) = oneshot::channel();
        let gone = || SpoolError::other("commit", &PathBuf::from(&id), "spool committer stopped");
        self.tx
            .send(Request {
                id: id.clone(),
                done,
            })
            .map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

fn run(root: PathBuf, rx: mpsc::Receiver<Request>) {
    let tmp = root.join("tmp");
    let incoming = root.join("incoming");
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let mut moved = Vec::with_capacity(batch.len());
        for req in batch {
            let from = tmp.join(&req.id);
            let to = incoming.join(&req.id);
            match durable::rename_unsynced(&from, &to) {
                Ok(()) => moved.push(req),
                Err(e) => {
                    let _ = req.done.send(Err(SpoolError::io("rename", &from, e)));
                }
            }
        }
        if moved.is_empty() {
            continue;
        }
        let synced = durable::fsync_dir(&incoming)
            .map_err(|e| (incoming.clone(), e))
            .and_then(|()| durable::fsync_dir(&tmp).map_err(|e| (tmp.clone(), e)));
        for req in moved {
            let res = match &synced {
                Ok(()) => Ok(()),
                Err((p, e)) => {
                    // Not acknowledged, so take it back out of incoming/ if we still can;
                    // if that fails too, recovery will see a complete message, which is
                    // harmless (at-least-once).
                    let _ = durable::rename_unsynced(&incoming.join(&req.id), &tmp.join(&req.id));
                    Err(SpoolError::io(
                        "fsync",
                        p,
                        std::io::Error::new(e.kind(), e.to_string()),
                    ))
                }
            };
            let _ = req.done.send(res);
        }
    }
}
