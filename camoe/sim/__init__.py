"""The traffic simulator (a generative world of users, ads and clicks, and a driver that
sends it through Kafka) and the whole loop run on it. It stands beside the product: only
the CLI and the benchmarks import it."""
