# Redis for docker-compose.yml where redis:7-alpine cannot be pulled: Debian bookworm's redis-server (7.0), built
# by docker/build-base.sh on its Debian base (no context needed: `docker build - < docker/redis.Dockerfile`).
ARG BASE_IMAGE=prefix-serve/base:bookworm
FROM ${BASE_IMAGE}
# --no-install-recommends: the server and redis-cli only; the package lists go with the layer that fetched them.
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/* \
    && mkdir -p /data && chown redis:redis /data
# The package's user (not root); /data is the append-only file's volume.
USER redis
WORKDIR /data
EXPOSE 6379
HEALTHCHECK --interval=5s --timeout=3s --retries=10 CMD ["redis-cli", "ping"]
# Debian's default config binds loopback and daemonizes: none of it here, every setting on the command line.
CMD ["redis-server", "--bind", "0.0.0.0", "--protected-mode", "no", "--dir", "/data", "--appendonly", "yes"]
