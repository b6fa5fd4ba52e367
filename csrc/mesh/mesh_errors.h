// Exceptions of the mesh transport. The bindings map them to
// afdkit.mesh.MeshError (a RuntimeError) and its subclasses, so a caller catches
// a timeout or a dead peer instead of the process aborting.
#pragma once
#include <stdexcept>

#include "common/errors.h"

namespace afdkit::mesh {

struct MeshError : std::runtime_error {
  using std::runtime_error::runtime_error;
};
// A wait or flush ran past its timeout; the message names the peer, the key and the time waited.
struct MeshTimeout : MeshError {
  using MeshError::MeshError;
};
// A peer process died or closed, or another rank reported a lost peer (the mesh is poisoned).
struct MeshPeerLost : MeshError {
  using MeshError::MeshError;
};
// Raised by the Python bootstrap (secret mismatch); declared here so all four share one hierarchy.
struct MeshAuthError : MeshError {
  using MeshError::MeshError;
};

}  // namespace afdkit::mesh

#define AFDKIT_MESH_THROW(ExcType, ...) throw ::afdkit::mesh::ExcType(::afdkit::str_cat(__VA_ARGS__))
