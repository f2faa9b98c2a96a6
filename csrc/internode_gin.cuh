// The internode kernels with the GIN net (commkit::GinNet): the header the JIT includes to instantiate
// them, compiled with the NCCL headers on the include path (commkit/backends/internode_net.py).
#pragma once

#include "csrc/net_gin.cuh"
#include "csrc/internode_combine.cuh"
#include "csrc/internode_dispatch.cuh"
