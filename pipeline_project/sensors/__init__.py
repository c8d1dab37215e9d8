"""Sensors: discovery of landing batches, and alerting."""
