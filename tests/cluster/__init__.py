"""Tests against a real three-node RabbitMQ cluster started on this machine.

They are slow and need `rabbitmq-server`; run them with `make test-cluster`.
"""
