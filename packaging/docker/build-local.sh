#!/bin/sh
# Build postern's image without a container registry: compile on this (Debian 12) host, then
# package the binary with the Dockerfile's `prebuilt` stage (FROM scratch: nothing to pull).
#
# usage: packaging/docker/build-local.sh [TAG]      (default tag: postern)
#   POSTERN_BIN=path  use an already built binary instead of `cargo build --release`
set -eu
tag=${1:-postern}
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
bin=${POSTERN_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked --bin postern
  bin=target/release/postern
fi
packaging/docker/rootfs.sh "$bin" target/docker-rootfs
docker build --target prebuilt -t "$tag" -f Dockerfile .
