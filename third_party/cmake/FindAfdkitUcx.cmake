# Locates UCX (ucp, uct, ucs) and defines the imported target afdkit::ucx. Order:
#   1. -DAFDKIT_UCX_ROOT=... or the environment variable of the same name (a prefix
#      holding include/ucp and lib/libucp.so, e.g. a system UCX built with verbs)
#   2. the libucx-cu13 wheel, found through Python; Python loads its libraries with
#      libucx.load_library() before importing afdkit._C. The wheel ships a CMake
#      package `ucx`, but its paths use an unset ${prefix} (not relocatable), so the
#      headers and libraries are located here directly.
#   3. a system UCX found by CMake's package search
set(_ucx_prefixes "")
if(DEFINED AFDKIT_UCX_ROOT)
  list(APPEND _ucx_prefixes ${AFDKIT_UCX_ROOT})
elseif(DEFINED ENV{AFDKIT_UCX_ROOT})
  list(APPEND _ucx_prefixes $ENV{AFDKIT_UCX_ROOT})
endif()
if(Python_EXECUTABLE)
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import libucx, os; print(os.path.dirname(libucx.__file__))"
    OUTPUT_VARIABLE _ucx_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(_ucx_wheel)
    list(APPEND _ucx_prefixes ${_ucx_wheel})
  endif()
endif()

find_path(AFDKIT_UCX_INCLUDE_DIR ucp/api/ucp.h HINTS ${_ucx_prefixes} PATH_SUFFIXES include)
find_library(AFDKIT_UCP_LIBRARY NAMES ucp HINTS ${_ucx_prefixes} PATH_SUFFIXES lib lib64)
find_library(AFDKIT_UCT_LIBRARY NAMES uct HINTS ${_ucx_prefixes} PATH_SUFFIXES lib lib64)
find_library(AFDKIT_UCS_LIBRARY NAMES ucs HINTS ${_ucx_prefixes} PATH_SUFFIXES lib lib64)

if(AFDKIT_UCX_INCLUDE_DIR AND EXISTS "${AFDKIT_UCX_INCLUDE_DIR}/ucp/api/ucp_version.h")
  file(STRINGS "${AFDKIT_UCX_INCLUDE_DIR}/ucp/api/ucp_version.h" _ucx_ver_lines
       REGEX "#define UCP_API_(MAJOR|MINOR) +[0-9]+")
  string(REGEX REPLACE ".*UCP_API_MAJOR +([0-9]+).*" "\\1" _ucx_major "${_ucx_ver_lines}")
  string(REGEX REPLACE ".*UCP_API_MINOR +([0-9]+).*" "\\1" _ucx_minor "${_ucx_ver_lines}")
  set(AfdkitUcx_VERSION "${_ucx_major}.${_ucx_minor}")
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(AfdkitUcx
  REQUIRED_VARS AFDKIT_UCX_INCLUDE_DIR AFDKIT_UCP_LIBRARY AFDKIT_UCT_LIBRARY AFDKIT_UCS_LIBRARY
  VERSION_VAR AfdkitUcx_VERSION
  FAIL_MESSAGE "UCX not found: `pip install libucx-cu13` or set AFDKIT_UCX_ROOT to a UCX prefix")

if(AfdkitUcx_FOUND AND NOT TARGET afdkit::ucx)
  add_library(afdkit::ucx INTERFACE IMPORTED)
  set_target_properties(afdkit::ucx PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES "${AFDKIT_UCX_INCLUDE_DIR}"
    INTERFACE_LINK_LIBRARIES "${AFDKIT_UCP_LIBRARY};${AFDKIT_UCT_LIBRARY};${AFDKIT_UCS_LIBRARY}")
  mark_as_advanced(AFDKIT_UCX_INCLUDE_DIR AFDKIT_UCP_LIBRARY AFDKIT_UCT_LIBRARY AFDKIT_UCS_LIBRARY)
endif()
