# Locates the CUTLASS/CuTe headers. Order:
#   1. -DAFDKIT_CUTLASS_INCLUDE=... or the environment variable of the same name
#   2. the nvidia-cutlass wheel (cutlass_library/source/include), found through Python
# Defines CUTLASS_INCLUDE_DIRS and Cutlass_FOUND. Nothing is vendored.
set(_cutlass_hint "")
if(DEFINED AFDKIT_CUTLASS_INCLUDE)
  set(_cutlass_hint ${AFDKIT_CUTLASS_INCLUDE})
elseif(DEFINED ENV{AFDKIT_CUTLASS_INCLUDE})
  set(_cutlass_hint $ENV{AFDKIT_CUTLASS_INCLUDE})
elseif(Python_EXECUTABLE)
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c
      "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
    OUTPUT_VARIABLE _cutlass_hint OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
endif()

find_path(CUTLASS_INCLUDE_DIR cutlass/cutlass.h HINTS ${_cutlass_hint} NO_DEFAULT_PATH)
if(NOT CUTLASS_INCLUDE_DIR)
  find_path(CUTLASS_INCLUDE_DIR cutlass/cutlass.h)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(Cutlass
  REQUIRED_VARS CUTLASS_INCLUDE_DIR
  FAIL_MESSAGE "CUTLASS/CuTe headers not found: `pip install --no-deps nvidia-cutlass` or set AFDKIT_CUTLASS_INCLUDE to a folder holding cutlass/cutlass.h")
if(Cutlass_FOUND)
  set(CUTLASS_INCLUDE_DIRS ${CUTLASS_INCLUDE_DIR})
  mark_as_advanced(CUTLASS_INCLUDE_DIR)
endif()
