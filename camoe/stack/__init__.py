"""The local service stack: Kafka, Triton and Redis started as processes on 127.0.0.1
for the CLI, the tests and the benchmarks."""
