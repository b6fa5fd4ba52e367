#include "mesh/ucx_info.h"

#include <ucp/api/ucp.h>
#include <uct/api/uct.h>

#include <dlfcn.h>

#include <vector>

#include "common/errors.h"
#include "mesh/mesh_errors.h"

namespace afdkit::mesh {

std::string ucx_runtime_version() { return ucp_get_version_string(); }

std::string ucx_build_api_version() { return str_cat(UCP_API_MAJOR, ".", UCP_API_MINOR); }

std::string ucx_library_path() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&ucp_get_version), &info) && info.dli_fname) return info.dli_fname;
  return "";
}

void check_ucx_runtime() {
  unsigned major = 0, minor = 0, release = 0;
  ucp_get_version(&major, &minor, &release);
  if (major < UCP_API_MAJOR || (major == UCP_API_MAJOR && minor < UCP_API_MINOR)) {
    const std::string path = ucx_library_path();
    AFDKIT_MESH_THROW(MeshError, "afdkit.mesh: the UCX runtime ", major, ".", minor, ".", release,
                      path.empty() ? std::string() : str_cat(" (loaded from ", path, ")"),
                      " is older than UCX ", ucx_build_api_version(),
                      " that afdkit was built against; load the libucx wheel's libraries first "
                      "(import afdkit, which runs libucx.load_library(), before anything else that loads "
                      "UCX; do not set RAPIDS_LIBUCX_PREFER_SYSTEM_LIBRARY), or put a UCX >= ",
                      ucx_build_api_version(), " first on LD_LIBRARY_PATH");
  }
}

namespace {
void add_md_transports(uct_component_h component, const char* md_name, std::vector<std::string>* out) {
  uct_md_config_t* config = nullptr;
  if (uct_md_config_read(component, nullptr, nullptr, &config) != UCS_OK) return;
  uct_md_h md = nullptr;
  ucs_status_t st = uct_md_open(component, md_name, config, &md);
  uct_config_release(config);
  if (st != UCS_OK) return;
  uct_tl_resource_desc_t* tls = nullptr;
  unsigned num_tls = 0;
  if (uct_md_query_tl_resources(md, &tls, &num_tls) == UCS_OK) {
    for (unsigned i = 0; i < num_tls; ++i) out->push_back(std::string(tls[i].tl_name) + "/" + tls[i].dev_name);
    uct_release_tl_resource_list(tls);
  }
  uct_md_close(md);
}
}  // namespace

std::vector<std::string> ucx_transports() {
  std::vector<std::string> out;
  uct_component_h* components = nullptr;
  unsigned num_components = 0;
  if (uct_query_components(&components, &num_components) != UCS_OK) return out;
  for (unsigned c = 0; c < num_components; ++c) {
    uct_component_attr_t attr{};
    attr.field_mask = UCT_COMPONENT_ATTR_FIELD_MD_RESOURCE_COUNT;
    if (uct_component_query(components[c], &attr) != UCS_OK || attr.md_resource_count == 0) continue;
    std::vector<uct_md_resource_desc_t> mds(attr.md_resource_count);
    attr.field_mask = UCT_COMPONENT_ATTR_FIELD_MD_RESOURCES;
    attr.md_resources = mds.data();
    if (uct_component_query(components[c], &attr) != UCS_OK) continue;
    for (const auto& md : mds) add_md_transports(components[c], md.md_name, &out);
  }
  uct_release_component_list(components);
  return out;
}

}  // namespace afdkit::mesh
