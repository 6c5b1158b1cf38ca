//! `[admin]`: the HTTP listener for metrics, health and the status page. It shows the queue,
//! mailboxes and errors, so on anything but a loopback address it needs a token.

use super::super::AdminConfig;
use super::super::raw::RawAccount;
use super::{Checker, parse_socket_addr};

impl Checker<'_, '_> {
    /// `None` when the table is absent or unusable (its errors are recorded).
    pub(super) fn admin(&mut self, r: Option<RawAccount>) -> Option<AdminConfig> {
        let r = r?;
        let address = match r.get("address") {
            Some(a) => match parse_socket_addr(a.get_ref()) {
                Ok(addr) => Some((addr, a.span())),
                Err(msg) => {
                    self.c.at(&a.span(), "admin.address", msg);
                    None
                }
            },
            None => {
                self.missing(
                    &r.header,
                    "admin",
                    "address",
                    "address = \"127.0.0.1:9925\" (an IP address and port; loopback unless a token is set)",
                );
                None
            }
        };
        let token = self.secret(&r, "admin", "token", false)?;
        let (address, span) = address?;
        if token.is_none() && !address.ip().is_loopback() {
            self.c.at(
                &span,
                "admin.address",
                format!(
                    "{address} is not a loopback address and no token is set: anyone who reaches it could read the queue, the mailboxes and their errors; listen on \"127.0.0.1:{}\", or add token_file = \"/etc/postern/admin-token\" (mode 0600; clients send it as \"Authorization: Bearer TOKEN\")",
                    address.port()
                ),
            );
            return None;
        }
        Some(AdminConfig { address, token })
    }
}
