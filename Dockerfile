# The one image the Helm chart runs: moat-server (the entrypoint), moat-enforcer, moatctl.
#
#   ./scripts/image.sh          the binaries built on this machine go into the runtime image
#   ./scripts/image.sh --full   everything is built inside, with scripts/toolchain.sh
#
# BASE is Debian (versions.env's suite): from a registry where one is reachable, else a
# root filesystem scripts/image.sh makes with mmdebstrap. The same file either way.
ARG BASE=docker.io/library/debian:bookworm-slim
# build: compile in the build stage; context: take target/image/ (scripts/image.sh stages the
# stripped binaries there) from the build context.
ARG BINARIES=build

FROM ${BASE} AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates curl gcc libc6-dev pkg-config \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo PATH=/usr/local/cargo/bin:$PATH
# The toolchain first (its own layer): the versions and the script setup.sh runs.
COPY scripts/versions.env scripts/toolchain.sh /src/scripts/
# rustup-init straight from the Rust project's dist server (what sh.rustup.rs downloads).
# The optional secret `ca-bundle` is the building machine's trust store, for networks whose
# egress presents its own CA (scripts/image.sh --full passes it); nothing of it is kept.
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then \
      export SSL_CERT_FILE=/run/secrets/ca-bundle CURL_CA_BUNDLE=/run/secrets/ca-bundle CARGO_HTTP_CAINFO=/run/secrets/ca-bundle; \
    fi \
 && . /src/scripts/versions.env \
 && export MOAT_EBPF_TOOLCHAIN="$RUST_NIGHTLY" \
 && curl -sSfo /tmp/rustup-init "https://static.rust-lang.org/rustup/dist/$(uname -m)-unknown-linux-gnu/rustup-init" \
 && chmod +x /tmp/rustup-init \
 && /tmp/rustup-init -y --no-modify-path --profile minimal --default-toolchain "$RUST_VERSION" \
 && rm /tmp/rustup-init \
 && /src/scripts/toolchain.sh
WORKDIR /src
COPY . .
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export CARGO_HTTP_CAINFO=/run/secrets/ca-bundle; fi \
 && . scripts/versions.env && export MOAT_EBPF_TOOLCHAIN="$RUST_NIGHTLY" \
 && cargo build --release --locked -p moat-server -p moat-enforcer -p moat-cli \
 && mkdir /out \
 && for b in moat-server moat-enforcer moatctl; do strip --strip-debug -o /out/$b target/release/$b; done

FROM scratch AS binaries-context
COPY target/image/moat-server target/image/moat-enforcer target/image/moatctl /out/

FROM build AS binaries-build

FROM binaries-${BINARIES} AS binaries

FROM ${BASE}
# A base imported from a root filesystem has no environment; nft is found by PATH.
ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="moat" \
      org.opencontainers.image.description="Kubernetes NetworkPolicy enforcement: policy server and node enforcer" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/moat-netpol/moat"
# What the binaries call at run time: nft (full snapshots through `nft -j -f`) and CA
# certificates; nothing else.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables ca-certificates \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
COPY --from=binaries /out/ /usr/local/bin/
# Non-root by default (the server's user in the chart); the chart runs the enforcer as root
# with only the capabilities it grants.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/moat-server"]
