# syntax=docker/dockerfile:1
# One image per service, one target each: `make images` builds frontend, policy, rewriter and
# relay from this file with the repository root as the build context.
#
#   docker build --target relay -t submitd-relay:dev .
#
# Build: Debian 12's Python 3.11 in a virtualenv holding common + the one service (and only
# its dependencies), pinned by constraints.txt; pip and setuptools leave the virtualenv once
# they have installed it (nothing at run time needs them). Run: the same Debian with only its Python, the
# shells and package tools removed (nothing at run time needs them), as the non-root user
# 65532. The root filesystem can be mounted read-only: the services write nothing outside
# mounted volumes. A distroless python3-debian12 image works as RUNTIME_IMAGE too (same Python
# at the same path).
ARG BUILD_IMAGE=debian:12-slim
ARG RUNTIME_IMAGE=debian:12-slim

FROM ${BUILD_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY constraints.txt ./
COPY proto ./proto
COPY services/common ./services/common
RUN python3 -m venv /tools \
 && /tools/bin/pip install -c constraints.txt grpcio-tools \
 && mkdir -p services/common/src/submitd/v1 \
 && /tools/bin/python -m grpc_tools.protoc -Iproto --python_out=services/common/src \
      --grpc_python_out=services/common/src proto/submitd/v1/*.proto \
 && touch services/common/src/submitd/__init__.py services/common/src/submitd/v1/__init__.py

FROM build AS build-frontend
COPY services/frontend ./services/frontend
RUN python3 -m venv /venv && /venv/bin/pip install -c constraints.txt ./services/common ./services/frontend \
 && /venv/bin/python -m pip uninstall -q -y pip setuptools

FROM build AS build-policy
COPY services/policy ./services/policy
RUN python3 -m venv /venv && /venv/bin/pip install -c constraints.txt ./services/common ./services/policy \
 && /venv/bin/python -m pip uninstall -q -y pip setuptools

FROM build AS build-rewriter
COPY services/rewriter ./services/rewriter
RUN python3 -m venv /venv && /venv/bin/pip install -c constraints.txt ./services/common ./services/rewriter \
 && /venv/bin/python -m pip uninstall -q -y pip setuptools

FROM build AS build-relay
COPY services/relay ./services/relay
RUN python3 -m venv /venv && /venv/bin/pip install -c constraints.txt ./services/common ./services/relay \
 && /venv/bin/python -m pip uninstall -q -y pip setuptools

FROM ${RUNTIME_IMAGE} AS python
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt /var/log/* \
 && rm -f /usr/bin/apt* /usr/bin/dpkg* /usr/bin/bash /usr/bin/dash /usr/bin/sh /usr/bin/su

FROM python AS runtime
ARG VERSION=dev
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.vendor="submitd" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 65532:65532

FROM runtime AS frontend
LABEL org.opencontainers.image.title="submitd-frontend" \
      org.opencontainers.image.description="submitd SMTP submission frontend (587 STARTTLS, 465 TLS)"
COPY --from=build-frontend /venv /venv
EXPOSE 587 465 8080
ENTRYPOINT ["/venv/bin/python3", "-m", "submitd_frontend"]

FROM runtime AS policy
LABEL org.opencontainers.image.title="submitd-policy" \
      org.opencontainers.image.description="submitd policy service (AUTH and submission rules, gRPC)"
COPY --from=build-policy /venv /venv
EXPOSE 50051 8080
ENTRYPOINT ["/venv/bin/python3", "-m", "submitd_policy"]

FROM runtime AS rewriter
LABEL org.opencontainers.image.title="submitd-rewriter" \
      org.opencontainers.image.description="submitd header rewriter and DKIM signer (gRPC)"
COPY --from=build-rewriter /venv /venv
EXPOSE 50052 8080
ENTRYPOINT ["/venv/bin/python3", "-m", "submitd_rewriter"]

FROM runtime AS relay
LABEL org.opencontainers.image.title="submitd-relay" \
      org.opencontainers.image.description="submitd relay: queue consumer, delivery, DSNs, queue admin API"
COPY --from=build-relay /venv /venv
EXPOSE 8080
ENTRYPOINT ["/venv/bin/python3", "-m", "submitd_relay"]
