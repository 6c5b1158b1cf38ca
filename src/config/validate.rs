//! raw → typed config (placeholder until the config work lands).
use super::Config;

/// One configuration error.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// All configuration errors found.
#[derive(Debug, thiserror::Error)]
#[error("configuration errors")]
pub struct ConfigErrors(pub Vec<ConfigError>);

/// Load and validate a config file.
pub fn load_file(_path: &std::path::Path) -> Result<Config, ConfigErrors> {
    Err(ConfigErrors(vec![]))
}
/// Load and validate config text; `source` names it in errors.
pub fn load_str(_text: &str, _source: &str) -> Result<Config, ConfigErrors> {
    Err(ConfigErrors(vec![]))
}
/// Load the embedded default.
pub fn load_default() -> Result<Config, ConfigErrors> {
    load_str(super::EMBEDDED_DEFAULT, "<embedded default>")
}
