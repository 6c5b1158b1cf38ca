# postern's runtime image: the binary, its C libraries and the CA certificates on an empty base
# (no shell, no package manager), running as the unprivileged user postern (10025), with the
# spool and the state (tokens, and the file transport's output) as volumes.
#
# Where a registry is reachable (docker.io), build from source:
#     docker build -t postern .
# Without a registry (air-gapped hosts, CI): build the binary on a Debian 12 host and package
# it with the same image definition (the `prebuilt` stage below):
#     packaging/docker/build-local.sh postern
#
# Configure it with POSTERN_* environment variables (see the README and
# packaging/docker/compose.yaml), or mount a file at /etc/postern/postern.toml (a file, when
# there is one, wins over the variables).

ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm

# What every variant of the image is: user, ports, volumes, health check, stop signal.
FROM scratch AS runtime-base
LABEL org.opencontainers.image.title="postern" \
      org.opencontainers.image.description="Local SMTP relay to Microsoft 365 with OAuth2" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
# Without any other setting the container listens on port 25 of its own address for the
# private networks (compose networks), and writes mail into /var/lib/postern/delivered until an
# account is configured.
ENV POSTERN_LISTEN=0.0.0.0:25
# Docker >= 20.10 lets an unprivileged user bind ports below 1024 inside a container
# (net.ipv4.ip_unprivileged_port_start=0); on older engines listen on 2525 instead.
USER 10025:10025
EXPOSE 25 587
VOLUME ["/var/spool/postern", "/var/lib/postern"]
# SIGTERM: postern stops accepting, lets deliveries in flight finish within
# POSTERN_SHUTDOWN_GRACE (8 s by default in a container, inside `docker stop`'s 10 s; raise
# both together: stop_grace_period in compose, --stop-timeout with docker run).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/bin/postern", "health"]
ENTRYPOINT ["/usr/bin/postern"]
CMD ["serve"]

# A binary built on the host (packaging/docker/build-local.sh assembles the tree).
FROM runtime-base AS prebuilt
COPY target/docker-rootfs/root/ /
COPY --chown=10025:10025 target/docker-rootfs/spool/ /var/spool/postern/
COPY --chown=10025:10025 target/docker-rootfs/state/ /var/lib/postern/

# Built from source.
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin postern \
 && packaging/docker/rootfs.sh target/release/postern /rootfs

FROM runtime-base AS runtime
COPY --from=build /rootfs/root/ /
COPY --from=build --chown=10025:10025 /rootfs/spool/ /var/spool/postern/
COPY --from=build --chown=10025:10025 /rootfs/state/ /var/lib/postern/
