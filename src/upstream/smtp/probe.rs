//! `postern doctor`'s check of an SMTP route: connect, STARTTLS, AUTH XOAUTH2 as the route's
//! mailbox, QUIT. No message is sent. Every step goes through the same code as a delivery, so
//! what doctor reports is what the forwarder would meet.

use super::{Conn, Context, SmtpTransport};
use crate::upstream::Outcome;

/// What a successful probe saw.
#[derive(Debug, Clone)]
pub struct Probe {
    /// `host:port`.
    pub server: String,
    /// The server's reply to AUTH.
    pub auth_reply: String,
}

impl SmtpTransport {
    /// Sign in as `mailbox` and log out again, without sending mail. `Err` carries the
    /// outcome a delivery would have had (its reason quotes the server's reply).
    pub async fn probe_login(&self, mailbox: &str) -> Result<Probe, Outcome> {
        let server = self.server();
        let ctx = Context {
            server: &server,
            account: &self.account,
            client_id: &self.client_id,
            app_only: self.app_only,
            mailbox,
            sender: mailbox,
            from: None,
            queue_id: "ID",
        };
        let token = match self
            .tokens
            .token(&self.account, mailbox, crate::token::Audience::Smtp)
            .await
        {
            Ok(t) => t.token,
            Err(e) => {
                return Err(Outcome::held(format!("no access token for {mailbox}: {e}")));
            }
        };
        let tcp = self.connect().await?;
        let mut plain = Conn::new(tcp, server.clone(), self.timeouts);
        if let Err(o) = self.plain_phase(&mut plain, &ctx).await {
            plain.quit().await;
            return Err(o);
        }
        let tls = self.handshake(plain.into_inner()?, &ctx).await?;
        let mut c = Conn::new(tls, server.clone(), self.timeouts);
        let result = async {
            let caps = self.ehlo(&mut c, &ctx).await?;
            if !caps.xoauth2 {
                return Err(Outcome::held(format!(
                    "{server} does not offer AUTH XOAUTH2 after STARTTLS (its EHLO reply: \"{}\")",
                    caps.text
                )));
            }
            self.auth(&mut c, &ctx, &token).await.map_err(|f| f.outcome)
        }
        .await;
        c.quit().await;
        result.map(|()| Probe {
            server,
            auth_reply: "235 Authentication successful".into(),
        })
    }
}
