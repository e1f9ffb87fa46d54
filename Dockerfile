# didhub container image: `docker compose build didhub` or `docker build -t didhub .`
#
# Builder and runtime are the same Debian release (bookworm): a binary built on a newer glibc
# (rust:1 alone follows Debian's newest release) would not start on bookworm-slim.

FROM rust:1-bookworm AS builder
WORKDIR /src
# Dependencies first, so editing src/ does not rebuild every crate: build once with stub
# sources, then with the real ones. Cargo.toml names a `[[bench]]` target: its file must exist
# for the manifest to load (the image never builds benches; the stub stays).
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
 && echo 'fn main() {}' > src/main.rs \
 && echo 'fn main() {}' > benches/core.rs \
 && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src target/release/didhub target/release/deps/didhub-* target/release/deps/libdidhub-* \
      target/release/.fingerprint/didhub-*
COPY hub.toml ./
COPY src ./src
RUN cargo build --release --locked \
 && install -m 0755 target/release/didhub /usr/local/bin/didhub \
 && /usr/local/bin/didhub --version

FROM debian:bookworm-slim
# ca-certificates: https:// InfluxDB and TLS brokers.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 didhub \
 && useradd --system --uid 10001 --gid didhub --home-dir /var/lib/didhub --no-create-home \
      --shell /usr/sbin/nologin didhub \
 && install -d -o didhub -g didhub -m 0700 /var/lib/didhub /var/lib/didhub-device
COPY --from=builder /usr/local/bin/didhub /usr/bin/didhub
# Fails the build here, not at `up`, if the binary wants a library the slim image lacks.
RUN ["/usr/bin/didhub", "--version"]
COPY docker/hub.toml /etc/didhub/hub.toml
COPY docker/device-entrypoint.sh /usr/local/bin/didhub-device
ENV RUST_LIB_BACKTRACE=0 \
    DIDHUB_CONFIG=/etc/didhub/hub.toml
USER didhub:didhub
WORKDIR /var/lib/didhub
# identity.json (the hub's secrets: back it up), hub.did, didhub.db.
VOLUME ["/var/lib/didhub"]
ENTRYPOINT ["/usr/bin/didhub"]
CMD ["run"]
