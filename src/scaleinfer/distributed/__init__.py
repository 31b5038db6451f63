"""Running one engine over several processes: the process group (parallel_state), the collectives
(communicators), tensor-parallel sharding (sharding), the driver's executor and the workers."""
