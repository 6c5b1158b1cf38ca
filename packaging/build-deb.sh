#!/bin/sh
# Build the Debian package with cargo-deb (cargo install cargo-deb --locked):
#   target/debian/postern_VERSION-1_amd64.deb
# It holds the stripped binary, the systemd unit, sysusers.d and tmpfiles.d files, the
# conffile /etc/postern/postern.toml, man pages, shell completions, and the maintainer scripts
# that create the postern user and register `sendmail` with update-alternatives.
#
# usage: packaging/build-deb.sh [--no-build]     (--no-build: use target/release/postern as is)
set -eu
cd "$(dirname "$0")/.."
if [ "${1:-}" != "--no-build" ]; then
  cargo build --release --locked --bin postern
fi
bin=target/release/postern
assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/man" "$assets/completions"
"$bin" manpages "$assets/man"
gzip -9n "$assets"/man/*.8
"$bin" completions bash > "$assets/completions/postern.bash"
"$bin" completions zsh > "$assets/completions/_postern"
"$bin" completions fish > "$assets/completions/postern.fish"
cargo deb --no-build
