//! Integration tests: the real `postern` binary, real SMTP clients, real files.

mod fake;
mod harness;

mod abuse;
mod cli;
mod clients;
mod crash;
mod delivery;
mod dsn;
mod graph;
mod graph_large;
mod input;
mod load;
mod m365;
mod observe;
mod operations;
mod powercut;
mod protocol;
mod reuse;
mod rewrite;
mod secrets;
mod sendmail;
mod spool_trust;
mod tls;
mod token;
mod trial;
mod upstream_smtp;
