// What the UCX library loaded at run time offers: its version and transports.
#pragma once
#include <string>
#include <vector>

namespace afdkit::mesh {

std::string ucx_runtime_version();
// "transport/device" pairs (e.g. "tcp/lo", "posix/memory", "cuda_ipc/cuda"), queried
// from UCT's components and memory domains. Empty when UCX finds none.
std::vector<std::string> ucx_transports();

}  // namespace afdkit::mesh
