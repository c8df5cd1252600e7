# The one image the Helm chart runs: moat-server and moat-enforcer.
# Not built in CI (no container builder on the test machines); kept minimal on purpose.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p moat-server -p moat-enforcer \
 && install -m 0755 target/release/moat-server target/release/moat-enforcer /usr/local/bin/

FROM debian:bookworm-slim
# nft: the nftables dataplane drives full snapshots through `nft -j -f`.
RUN apt-get update && apt-get install -y --no-install-recommends nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/moat-server /usr/local/bin/moat-enforcer /usr/local/bin/
# The server runs as 65532 (the chart sets it); the enforcer as root with only the
# capabilities the chart grants.
ENTRYPOINT ["/usr/local/bin/moat-server"]
