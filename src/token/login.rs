//! `postern login`: sign a mailbox in (device code, or browser + PKCE) and store its refresh token.
