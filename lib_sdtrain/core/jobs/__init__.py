"""Core — The job service: one worker, a FIFO of validated jobs, events, stop."""
