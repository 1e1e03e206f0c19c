# syntax=docker/dockerfile:1
# Bulkhead's daemon image, for machines with a container engine and a
# registry. `cargo xtask image` builds the same image offline, with the same
# files, entrypoint, command, user and labels (docs/image.md);
# tests/tests/image.rs fails when this final stage and that image drift apart.
#
#   docker build -t bulkhead:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
#     --build-arg SOURCE=https://example.org/your/bulkhead.git .

FROM rust:1.95-bookworm AS build
# The kernel programs need nightly (build-std for bpfel-unknown-none) under
# the toolchain name `nightly`, and bpf-linker built against that nightly's
# own LLVM: what xtask/src/setup.rs installs, pinned here.
ARG NIGHTLY=nightly-2026-05-19
ARG BPF_LINKER_VERSION=0.13.0
RUN rustup toolchain install "$NIGHTLY" --profile minimal --component rust-src \
 && rustup toolchain link nightly "$(rustc +"$NIGHTLY" --print sysroot)"
RUN set -eu; \
    lib="$(rustc +nightly --print sysroot)/lib"; \
    llvm="$(cd "$lib" && ls libLLVM.so.* | head -n 1)"; \
    major="${llvm#libLLVM.so.}"; major="${major%%.*}"; \
    mkdir -p /opt/llvm/lib; \
    ln -s "$lib/$llvm" /opt/llvm/lib/libLLVM.so; \
    ln -s "$lib/$llvm" "/opt/llvm/lib/$llvm"; \
    LLVM_PREFIX=/opt/llvm cargo install bpf-linker --version "$BPF_LINKER_VERSION" \
      --no-default-features --features "llvm-$major"
WORKDIR /src
COPY . .
# The release binary, then the image's file tree at target/image/rootfs: the
# binary at /usr/bin/bulkhead, the shared libraries ldd says it needs, a
# root entry in /etc/passwd and /etc/group, and /tmp.
ARG SOURCE_DATE_EPOCH=0
RUN cargo build --release -p enforcer \
 && SOURCE_DATE_EPOCH="$SOURCE_DATE_EPOCH" cargo xtask image --rootfs-only

FROM scratch
COPY --from=build /src/target/image/rootfs/ /
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unpublished
LABEL org.opencontainers.image.title="bulkhead" \
      org.opencontainers.image.description="Bulkhead: eBPF/XDP micro-segmentation enforcer" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.created="${CREATED}"
ENV PATH=/usr/bin
WORKDIR /
# Root: loading BPF programs and attaching them needs it (docs/image.md).
USER 0:0
ENTRYPOINT ["/usr/bin/bulkhead"]
CMD ["--help"]
