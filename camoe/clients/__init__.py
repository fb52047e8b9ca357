"""Clients of the services: Kafka client configuration and topic admin, the Triton
model client, and the feature reader and counter pusher over Feast."""
