# Locates the ONNX Runtime C API headers (API 21) and sets BMOE_ORT_INCLUDE_DIR.
# ORT_INCLUDE_DIR (CMake or environment variable) wins; otherwise the headers of
# Debian's libonnxruntime-dev 1.21.0 are fetched once into the build directory
# (PyPI's onnxruntime wheel ships no headers). The library never links onnxruntime.
if(NOT ORT_INCLUDE_DIR AND DEFINED ENV{ORT_INCLUDE_DIR})
  set(ORT_INCLUDE_DIR "$ENV{ORT_INCLUDE_DIR}")
endif()

if(ORT_INCLUDE_DIR)
  if(NOT EXISTS "${ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
    message(FATAL_ERROR "ORT_INCLUDE_DIR=${ORT_INCLUDE_DIR} has no onnxruntime_c_api.h")
  endif()
  set(BMOE_ORT_INCLUDE_DIR "${ORT_INCLUDE_DIR}")
else()
  set(_ort_cache "${CMAKE_BINARY_DIR}/_ort_headers")
  set(BMOE_ORT_INCLUDE_DIR "${_ort_cache}/root/usr/include/onnxruntime")
  if(NOT EXISTS "${BMOE_ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
    message(STATUS "Fetching ONNX Runtime 1.21 headers (Debian libonnxruntime-dev) into ${_ort_cache}")
    execute_process(
      COMMAND sh "${CMAKE_CURRENT_LIST_DIR}/fetch_ort_headers.sh" "${_ort_cache}"
      RESULT_VARIABLE _rc OUTPUT_VARIABLE _out ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0 OR NOT EXISTS "${BMOE_ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
      message(FATAL_ERROR
        "Could not get the ONNX Runtime C API headers.\n"
        "Either set ORT_INCLUDE_DIR (CMake or environment variable) to a directory holding "
        "onnxruntime_c_api.h (ORT >= 1.21), or allow the fetch of Debian's "
        "libonnxruntime-dev=1.21.0+dfsg-1 (needs apt-get, dpkg-deb and network).\n"
        "Fetch output:\n${_out}${_err}")
    endif()
  endif()
endif()
message(STATUS "ONNX Runtime headers: ${BMOE_ORT_INCLUDE_DIR}")
