# Leasehold node image: a static-ish Debian runtime with the one binary.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --bin leasehold

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/leasehold /usr/local/bin/leasehold
USER 65534:65534
EXPOSE 8080
ENTRYPOINT ["leasehold"]
CMD ["run"]
