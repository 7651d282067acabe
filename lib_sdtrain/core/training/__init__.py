"""Core — The training engine shared by every kind: the loop, batches on the device, one run's scaffolding, loss curve."""
