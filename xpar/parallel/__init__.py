"""Process groups (data x expert parallel), the DeepSpeed config, the grad norm, the engine.

`groups` (the rank layout), `ds_config` (the pure DeepSpeed config builder) and
`grad_norm` have no deepspeed import; `xpar.parallel.deepspeed`, the engine adapter,
is the only module in xpar that imports deepspeed (import it explicitly).
"""

from xpar.parallel.groups import ParallelGroups, init_parallel

__all__ = ["ParallelGroups", "init_parallel"]
