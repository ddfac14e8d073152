"""Process groups (data x expert parallel) and the one adapter to DeepSpeed.

`xpar.parallel.groups` has no deepspeed import; `xpar.parallel.deepspeed` is the
only module in xpar that imports deepspeed (import it explicitly).
"""

from xpar.parallel.groups import ParallelGroups, init_parallel

__all__ = ["ParallelGroups", "init_parallel"]
