# syntax=docker/dockerfile:1
# One image, three binaries: distribuidor (default), worker, cliente.
#   docker build -t tareas .
#   docker run tareas worker

# --- chef: the toolchain plus cargo-chef, shared by the build stages ---
FROM rust:1.95.0-slim-bookworm AS chef
RUN cargo install --locked cargo-chef@0.1.73
WORKDIR /app

# --- planner: a recipe of the dependencies only, so that they cache apart from the sources ---
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# --- builder: dependencies first (cached until Cargo.lock changes), then the workspace ---
FROM chef AS builder
COPY --from=planner /app/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked -p tareas-distribuidor -p tareas-worker -p cliente

# --- runtime: Debian slim, CA certificates, a non-root user ---
FROM debian:12.14-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home tareas
COPY --from=builder /app/target/release/distribuidor /app/target/release/worker /app/target/release/cliente /usr/local/bin/
USER tareas
ENV RUST_LOG=info
EXPOSE 8888 8080
CMD ["distribuidor"]
