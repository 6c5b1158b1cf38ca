//! Integration tests: the real `postern` binary, real SMTP clients, real files.

mod fake;
mod harness;

mod cli;
mod clients;
mod crash;
mod delivery;
mod input;
mod load;
mod m365;
mod observe;
mod powercut;
mod protocol;
mod secrets;
mod spool_trust;
mod tls;
mod token;
mod upstream_smtp;
