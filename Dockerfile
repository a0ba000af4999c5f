# syntax=docker/dockerfile:1
#
# Offshoot in a container.
#
#   docker build -t offshoot .
#   docker run --rm --init -p 6432:6432 -p 127.0.0.1:9187:9187 offshoot
#   psql "postgres://postgres@127.0.0.1:6432/shop.pr-42"
#
# The default configuration (conf/offshoot.toml) runs the embedded PostgreSQL
# with the demo database `shop`, which is why the runtime image carries the
# `postgresql` package. To proxy an existing server instead, mount another file
# over /etc/offshoot/offshoot.toml (docker-compose.yml does).
#
# --init: the embedded server's postmaster is started by pg_ctl and so becomes a
# child of PID 1; an init process reaps it when it exits.

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole tree (see .dockerignore): every target Cargo.toml names must exist
# (the tests live in integration/), and src/embedded.rs includes conf/demo-shop.sql.
COPY . .
# The cache mounts keep the registry and target/ between builds; target/ is not
# part of the image, so the binary is copied out in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -m 0755 target/release/offshoot /usr/local/bin/offshoot

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim
# postgresql: initdb, pg_ctl and postgres under /usr/lib/postgresql/15/bin for
# the embedded server; the package also creates the `postgres` user. Its own
# "main" cluster is not wanted here (offshoot makes its own under state.dir),
# so postgresql-common is told not to create one before the server is installed.
# Versions are not pinned: Debian security updates replace the pinned ones.
# hadolint ignore=DL3008
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates postgresql-common; \
    sed -ri 's/^#?\s*create_main_cluster\s*=.*/create_main_cluster = false/' \
        /etc/postgresql-common/createcluster.conf; \
    apt-get install -y --no-install-recommends postgresql; \
    rm -rf /var/lib/apt/lists/*; \
    install -d -o postgres -g postgres -m 0750 /var/lib/offshoot

COPY --from=builder /usr/local/bin/offshoot /usr/local/bin/offshoot
COPY conf/ /etc/offshoot/

# Both listeners default to 127.0.0.1, which is unreachable from outside a
# container. The admin API then wants its token for every request (serve makes
# it in state.dir); OFFSHOOT_CONFIG lets `docker exec ... offshoot branch list`
# find it.
ENV OFFSHOOT__PROXY__LISTEN=0.0.0.0:6432 \
    OFFSHOOT__ADMIN__LISTEN=0.0.0.0:9187 \
    OFFSHOOT_CONFIG=/etc/offshoot/offshoot.toml

USER postgres
# state.dir (".offshoot" in the default configuration) is relative to this.
WORKDIR /var/lib/offshoot
EXPOSE 6432 9187
# On SIGTERM (docker stop) offshoot drains connections for proxy.shutdown_grace
# (10s by default) and then stops the embedded server: give `docker stop` more
# than its default 10s (-t 30).
ENTRYPOINT ["offshoot"]
CMD ["serve", "--config", "/etc/offshoot/offshoot.toml"]
