"""Where the monitor's numbers go, one module per destination: console, W&B, metrics.jsonl.

Sinks exist on rank 0 only; the Monitor (xpar.train.monitor) builds them and feeds them.
"""
