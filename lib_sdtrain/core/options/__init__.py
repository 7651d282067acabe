"""Core — What a user asks for: validated job configurations, the learning-rate language, hypernetwork options, optimizer names."""
