//! Watching a transport's dialogue as it happens, for `postern test`, which prints every step
//! with the upstream's reply.
//!
//! The watcher is a task-local rather than a field of the transport, so the transports need
//! one line per event and no new parameters: deliveries run unwatched (each event costs one
//! task-local lookup), and `postern test` runs the very same code inside [`watched`]. A
//! transport that hands work to another task must carry the watcher over (or that work goes
//! unwatched; nothing else changes).

use std::future::Future;
use std::sync::Arc;

/// One thing that happened on the way to the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A TCP connection to `server` (`host:port`) is open.
    Connected {
        /// `host:port`.
        server: String,
    },
    /// Postern sent these command lines (several when pipelined; the token never appears:
    /// AUTH shows as `AUTH XOAUTH2 [redacted]`).
    Sent(String),
    /// The server answered (the whole reply on one line).
    Reply(String),
    /// TLS is up.
    Tls {
        /// `TLS 1.3`.
        version: String,
        /// The server certificate's subject (`CN=outlook.office365.com, ...`).
        subject: Option<String>,
    },
}

/// Receives the [`Event`]s of a watched dialogue.
pub trait Watcher: Send + Sync {
    /// One event, in order.
    fn event(&self, event: Event);
}

tokio::task_local! {
    static WATCHER: Arc<dyn Watcher>;
}

/// Run `f` with `watcher` seeing every event the transports report in it.
pub async fn watched<F: Future>(watcher: Arc<dyn Watcher>, f: F) -> F::Output {
    WATCHER.scope(watcher, f).await
}

/// Report the event `make` builds, if someone watches (else `make` is not called).
pub fn emit(make: impl FnOnce() -> Event) {
    let _ = WATCHER.try_with(|w| w.event(make()));
}

/// The subject of a DER certificate, as `CN=..., O=...`; `None` if it cannot be parsed.
pub fn certificate_subject(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.subject().to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    struct Log(Mutex<Vec<Event>>);
    impl Watcher for Log {
        fn event(&self, e: Event) {
            self.0.lock().unwrap().push(e);
        }
    }

    #[tokio::test]
    async fn only_watched_work_reports() {
        let log = Arc::new(Log(Mutex::new(Vec::new())));
        emit(|| panic!("not built when nobody watches"));
        watched(log.clone(), async {
            emit(|| Event::Sent("EHLO x".into()));
        })
        .await;
        emit(|| panic!("not built when nobody watches"));
        assert_eq!(*log.0.lock().unwrap(), vec![Event::Sent("EHLO x".into())]);
    }

    #[test]
    fn subjects_of_real_certificates() {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["smtp.test".into()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "outlook.office365.com");
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(
            certificate_subject(cert.der()).as_deref(),
            Some("CN=outlook.office365.com")
        );
        assert_eq!(certificate_subject(b"junk"), None);
    }
}
