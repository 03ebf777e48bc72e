# syntax=docker/dockerfile:1
#
# The keygate image: `/keygate`, one binary for every role (operator, sidecar, dev, CLI)
# chosen by subcommand, and `/keygate-sidecar`, the sidecar alone in a smaller executable.
# The Helm chart runs `keygate operator`; the webhook injects `/keygate-sidecar` from the
# same image into every opted-in pod.
#
#   docker build -t registry.example.com/keygate:0.1.0 .
#
# Needs a container engine with BuildKit (Docker 23+, or buildx / podman / buildah); the
# development machines and CI of this repository have none, so build it on a workstation or
# in your image pipeline (docs/install.md).
#
# Runtime base: gcr.io/distroless/cc-debian12:nonroot. keygate links aws-lc-rs, whose
# crypto is C code compiled into the binary; the binary is a normal glibc executable that
# needs libc, libm and libgcc_s at run time, which the `cc` distroless image ships (with CA
# certificates and tzdata) and `static` does not. The builder is Debian 12 too, so the glibc
# the binary was linked against is the one it runs with. A fully static musl build
# (x86_64-unknown-linux-musl + musl-tools, then distroless/static) also works, but needs a
# musl C toolchain for aws-lc-sys and musl's malloc is markedly slower under the
# multi-threaded token server, for no gain in attack surface: distroless/cc has no shell or
# package manager either.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG NFT_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
# Only what `cargo build` needs: the manifests, the sources, and benches/ (declared as a
# [[bench]] target in Cargo.toml, so the manifest does not load without it).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
# Cache the registry and the target directory between builds; the binary is copied out of
# the cache mount so it lands in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keygate --bin keygate-sidecar \
 && install -D -m 0755 target/release/keygate /out/keygate \
 && install -D -m 0755 target/release/keygate-sidecar /out/keygate-sidecar

# nft, for `keygate-sidecar capture` (the traffic-capture init container, docs/capture.md).
# distroless has no package manager, so nft and the shared libraries it needs beyond glibc
# are copied from the same Debian release as the runtime image (Debian 12). The capture
# container runs `nft -j -f -` and nothing else from here.
FROM ${NFT_IMAGE} AS nft
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nftables \
 && mkdir /out \
 && cp --parents /usr/sbin/nft /out/ \
 && ldd /usr/sbin/nft | awk '$3 ~ /^\// {print $3}' \
    | grep -v -e '/libc\.so' -e '/ld-linux' \
    | while read -r lib; do \
        dir="/out$(dirname "$(readlink -f "$lib")")"; mkdir -p "$dir"; cp -L "$lib" "$dir/"; \
      done \
 && find /out -type f

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="keygate" \
      org.opencontainers.image.description="Machine-to-machine API authentication for Kubernetes: operator, token server, admission webhook and sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/keygate /out/keygate-sidecar /
COPY --from=nft /out/ /
# distroless "nonroot": uid/gid 65532, matching the chart's runAsUser.
USER 65532:65532
# token server, operator admin, webhook, sidecar, sidecar admin
EXPOSE 8080 8081 9443 8100 8101
ENTRYPOINT ["/keygate"]
