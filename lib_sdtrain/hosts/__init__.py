"""Hosts: adapters that implement the core's TrainingHost port over a concrete model stack."""
