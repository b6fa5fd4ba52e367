#include "mesh/ucx_info.h"

#include <ucp/api/ucp.h>
#include <uct/api/uct.h>

#include <vector>

namespace afdkit::mesh {

std::string ucx_runtime_version() { return ucp_get_version_string(); }

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
