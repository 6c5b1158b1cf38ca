//! The Microsoft Graph transport (placeholder until h/graph lands: only the large-message part).

pub mod large;
