//! What the fuzz targets share: a configuration built from TOML through postern's real
//! loader, so new config fields never break a target.

use postern::config::{Config, load_str};

/// The top of every target's configuration (nothing in it is ever touched).
const TOP: &str = r#"
hostname = "mx.fuzz"
spool_dir = "/nonexistent"
state_dir = "/nonexistent"
"#;

/// Load [`TOP`] followed by `tables`; a target whose configuration does not load is a bug in
/// the target.
pub fn config(tables: &str) -> Config {
    match load_str(&format!("{TOP}\n{tables}"), "<fuzz>") {
        Ok(c) => c,
        Err(e) => panic!("fuzz config does not load: {e}"),
    }
}
