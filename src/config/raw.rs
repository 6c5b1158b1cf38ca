//! serde mirror of the TOML (placeholder until the config work lands).
