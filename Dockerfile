# syntax=docker/dockerfile:1
# The Vigil agent's image, for builders that reach a container registry and
# the LLVM apt repository (docs/image.md). It is not built by CI: the project's
# machines reach no registry. There `cargo xtask image` writes the same files
# into an OCI archive itself; this file's last stage copies exactly those files
# (`cargo xtask image --rootfs`), so both images hold the same tree.
#
#   docker build -t ghcr.io/vigil/vigil:0.1.0 .     (the tag: Chart.yaml appVersion)
#
# The build arguments below are the kernel programs' pin (probes-toolchain.toml;
# an xtask unit test keeps them equal).

FROM rust:1.95-bookworm AS build
ARG LLVM=22
ARG PROBES_CHANNEL=nightly-2026-05-20
ARG BPF_LINKER=0.13.0
# LLVM for bpf-linker (Debian 12 has no LLVM 22), binutils for strip,
# ca-certificates for the image's CA bundle.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates gnupg wget binutils \
 && wget -qO- https://apt.llvm.org/llvm-snapshot.gpg.key | gpg --dearmor -o /usr/share/keyrings/llvm.gpg \
 && echo "deb [signed-by=/usr/share/keyrings/llvm.gpg] http://apt.llvm.org/bookworm/ llvm-toolchain-bookworm-${LLVM} main" \
      > /etc/apt/sources.list.d/llvm.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends llvm-${LLVM}-dev libpolly-${LLVM}-dev \
 && rm -rf /var/lib/apt/lists/*
RUN rustup toolchain install ${PROBES_CHANNEL} --profile minimal --component rust-src
RUN LLVM_PREFIX=/usr/lib/llvm-${LLVM} LLVM_SYS_${LLVM}1_PREFIX=/usr/lib/llvm-${LLVM} \
    cargo install bpf-linker --version ${BPF_LINKER} --locked \
      --no-default-features --features llvm-${LLVM}
WORKDIR /src
COPY . .
# The stripped release binary, the glibc objects it loads, the CA bundle.
RUN cargo xtask image --rootfs /rootfs

FROM scratch
COPY --from=build /rootfs/ /
ENV PATH=/usr/local/bin:/usr/bin:/bin
ENTRYPOINT ["/usr/local/bin/vigil"]
CMD ["agent"]
