# syntax=docker/dockerfile:1
# Multi-stage build: compile with the Rust toolchain image, run on a slim
# Debian base as a non-root user. Build: docker build -t sessionguard .
FROM rust:1-slim-bookworm AS build
WORKDIR /src
# The whole workspace (cargo reads every member's manifest), but only the
# shipped binary is built: it links neither the emulator nor the driver.
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
# Patched third-party crates the workspace builds from (vendor/*/PATCHES.md).
COPY vendor ./vendor
RUN cargo build --release --locked -p sessionguard

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin sessionguard
COPY --from=build /src/target/release/sessionguard /usr/local/bin/sessionguard
COPY config/sessionguard.toml /etc/sessionguard/sessionguard.toml
# Inside a container the proxy and admin API must listen on all interfaces;
# every other setting comes from the mounted config file or SESSIONGUARD_* env.
# Set proxy.admin_token in that file to guard /sessions and /violations (the
# proxy warns at start while the admin API is open beyond loopback).
ENV SESSIONGUARD_LISTEN=0.0.0.0:27018 \
    SESSIONGUARD_ADMIN=0.0.0.0:9216 \
    SESSIONGUARD_LOG_FORMAT=json
# The data path prefers io_uring, which Docker's default seccomp profile
# blocks: it then runs on epoll and its "data path I/O driver" log line says
# why. Run with a seccomp profile that allows io_uring_setup, io_uring_enter
# and io_uring_register to get io_uring (see README, Deploying).
USER 10001
EXPOSE 27018 9216
# Shell form on purpose: `|| exit 1` maps every curl failure to the one
# status Docker documents as unhealthy.
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:9216/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/sessionguard"]
CMD ["proxy", "--config", "/etc/sessionguard/sessionguard.toml"]
