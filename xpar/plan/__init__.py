"""`xpar plan`: memory and all-to-all traffic of a config on a cluster that is not here.

estimate.py: pure functions of a validated XparConfig and a Cluster; report.py: the text;
cli.py: the command (flags checked, then the config composed, before anything is built).
"""
