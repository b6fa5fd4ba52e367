// What the UCX library loaded at run time offers: its version and transports.
#pragma once
#include <string>
#include <vector>

namespace afdkit::mesh {

std::string ucx_runtime_version();
// "major.minor" of the UCX headers afdkit was compiled against.
std::string ucx_build_api_version();
// The file the process resolved libucp from ("" if unknown).
std::string ucx_library_path();
// Throws MeshError, naming both versions and the library's path, when the loaded UCX is
// older than the one afdkit was built against (e.g. a system libucp found before the
// libucx wheel's: import afdkit -- which loads the wheel first -- before anything else
// that loads UCX, or put the matching UCX first on LD_LIBRARY_PATH).
void check_ucx_runtime();
// "transport/device" pairs (e.g. "tcp/lo", "posix/memory", "cuda_ipc/cuda"), queried
// from UCT's components and memory domains. Empty when UCX finds none.
std::vector<std::string> ucx_transports();

}  // namespace afdkit::mesh
