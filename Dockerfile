# attnd images: the attnd daemon and attnctl (health checks, demos). From the repository root,
# with BuildKit (Docker 23+ by default; DOCKER_BUILDKIT=1 before):
#   docker build --target cuda -t attnd:cuda .   # a GPU node: CUDA backend (sm_90a), CPU fallback
#   docker build --target cpu  -t attnd:cpu  .   # any x86-64 host: CPU backend only
# scripts/image.sh builds and checks both from nothing on Debian 12 (its own dockerd, a base
# image made with debootstrap, the CUDA wheels fetched on the host into deploy/cuda/wheels).
#
# Who runs attnd: uid 10001 (attnd), not root. A client's POSIX shared memory is a 0600 object
# of the client's uid and attnd opens it only for that uid (README, "Security"), so as 10001
# it serves host regions to clients running as 10001, and CUDA regions (IPC handles, no file)
# to every client that may open its socket. To serve the host regions of a client of another
# uid, run the image as that uid (`docker run --user UID:GID`); for clients of several uids,
# as root (`--user 0:0`), which opens them through CAP_DAC_OVERRIDE (in Docker's default set;
# in Kubernetes, add it back after dropping ALL). Either way the container shares the
# host's IPC namespace (--ipc=host) and a host folder for the socket (-v /run/attnd:/run/attnd),
# owned by the uid attnd runs as.

ARG BUILD_IMAGE=debian:12
ARG RUNTIME_IMAGE=debian:12-slim

# ---- deps: the Debian packages that build attnd and attnctl ----------------------------------
FROM ${BUILD_IMAGE} AS deps
WORKDIR /src
# setup.sh alone first, so that this layer outlives source changes. ccache: the compile steps
# below keep its cache in a BuildKit cache mount, so a rebuild after a source change compiles
# only what changed (layers alone would redo the whole tree).
COPY scripts/setup.sh scripts/setup.sh
RUN scripts/setup.sh build \
 && apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ccache \
 && rm -rf /var/lib/apt/lists/*
ENV CCACHE_DIR=/ccache

# ---- cuda-toolkit: nvcc and the CUDA runtime from NVIDIA's wheels ----------------------------
# The wheels are the one CUDA toolkit that installs without NVIDIA's apt repository or images.
FROM deps AS cuda-toolkit
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends python3-pip \
 && rm -rf /var/lib/apt/lists/*
# From deploy/cuda/wheels when scripts/image.sh (or you) put them there, else from PyPI. A bind
# mount, not a COPY: 100 MB of wheels need not become a layer.
RUN --mount=type=bind,source=deploy/cuda,target=/cuda \
    set -eu; \
    if ls /cuda/wheels/*.whl >/dev/null 2>&1; then from="--no-index --find-links=/cuda/wheels"; \
    else from=""; fi; \
    python3 -m pip install -q --root-user-action=ignore --no-deps --target=/tmp/wheels $from \
      -r /cuda/requirements.txt; \
    mv /tmp/wheels/nvidia/cu13 /opt/cuda && rm -rf /tmp/wheels; \
    cd /opt/cuda; \
    # The layout nvcc.profile and FindCUDAToolkit expect of a toolkit, which the wheels lack:
    # targets/<arch>/{include,lib}, lib64, and an unversioned libcudart.so (FindCUDAToolkit
    # requires one; attnd links libcudart_static.a).
    mkdir -p targets/x86_64-linux; \
    ln -s ../../include targets/x86_64-linux/include; \
    ln -s ../../lib targets/x86_64-linux/lib; \
    ln -s lib lib64; \
    ln -s libcudart.so.13 lib/libcudart.so; \
    bin/nvcc --version | tail -2

# ---- build: attnd (CPU backend) and attnctl --------------------------------------------------
FROM deps AS build
# Only what the daemon and the client need; tests and benchmarks are not built into the image.
COPY CMakeLists.txt ./
COPY proto proto
COPY kernels kernels
COPY server server
COPY client client
RUN --mount=type=cache,target=/ccache \
    cmake -S . -B /build -G Ninja -DCMAKE_BUILD_TYPE=Release -DATTND_CUDA=OFF \
      -DATTND_BUILD_TESTS=OFF -DATTND_BUILD_BENCH=OFF \
      -DCMAKE_C_COMPILER_LAUNCHER=ccache -DCMAKE_CXX_COMPILER_LAUNCHER=ccache \
 && ninja -C /build attnd attnctl

# ---- build-cuda: the same tree reconfigured with CUDA ----------------------------------------
# Only the CUDA kernels, the CUDA platform and the one factory that names it differ from the
# CPU build, so this reuses its objects and compiles just those.
FROM build AS build-cuda
COPY --from=cuda-toolkit /opt/cuda /opt/cuda
RUN --mount=type=cache,target=/ccache \
    cmake -S . -B /build -DATTND_CUDA=ON -DCMAKE_CUDA_COMPILER=/opt/cuda/bin/nvcc \
      -DCUDAToolkit_ROOT=/opt/cuda -DCMAKE_CUDA_ARCHITECTURES=90a \
      -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache \
 && ninja -C /build attnd attnctl \
 && if ldd /build/server/attnd | grep -E 'libcudart|libcuda\.'; then \
      echo "attnd must link the CUDA runtime statically (the runtime image has none)" >&2; \
      exit 1; \
    fi

# ---- runtime: what both images share ---------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# The shared libraries of the Debian 12 packages the build linked (scripts/setup.sh build);
# libucx0 is UCX (libucx-dev's runtime, with its tcp, shared-memory and InfiniBand transports),
# for the KV transfer between attnd processes.
RUN apt-get update -q \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      libgrpc++1.51 libprotobuf32 libabsl20220623 libspdlog1.10 libfmt9 libssl3 \
      libprometheus-cpp-core1.0 libprometheus-cpp-pull1.0 \
      libucx0 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log
# A fixed uid, so that hosts can own the socket folder for it and Kubernetes can check
# runAsNonRoot; the header says why not root.
RUN groupadd --system --gid 10001 attnd \
 && useradd --system --uid 10001 --gid attnd --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin attnd \
 && install -d -o attnd -g attnd -m 0750 /run/attnd \
 && install -d -m 0755 /etc/attnd
USER 10001:10001
# gRPC over TCP, Prometheus /metrics.
EXPOSE 50051 9464
# attnd drains on SIGTERM (--drain_timeout_s, 30 s by default): stop with a longer grace period
# (docker stop -t 40, terminationGracePeriodSeconds: 45).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["attnctl", "--target=unix:///run/attnd/attnd.sock", "--timeout_ms=2000", "health"]
ENTRYPOINT ["attnd"]
# Every setting is a flag; for more than a few, mount a flagfile and pass
# --flagfile=/etc/attnd/attnd.flags (one --flag=value per line; attnd --check_config checks
# one). TCP in the clear is for a private network only: mount a certificate and key and replace
# --insecure_tcp with --tls_cert_file/--tls_key_file (and --token_file to tell clients apart).
CMD ["--unix_socket=/run/attnd/attnd.sock", \
     "--tcp_address=0.0.0.0:50051", \
     "--insecure_tcp", \
     "--metrics_port=9464", \
     "--metrics_bind=0.0.0.0", \
     "--backend=auto"]

# ---- cpu: the CPU backend only ---------------------------------------------------------------
FROM runtime AS cpu
COPY --from=build /build/server/attnd /build/client/attnctl /usr/local/bin/

# ---- cuda (the default target): the CUDA backend, and the CPU backend where no GPU is seen ----
# The CUDA runtime is inside attnd (static); the NVIDIA container toolkit mounts the driver
# (libcuda) when the container is started with GPUs (--gpus all, or the device plugin).
FROM runtime AS cuda
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility
COPY --from=build-cuda /build/server/attnd /build/client/attnctl /usr/local/bin/
