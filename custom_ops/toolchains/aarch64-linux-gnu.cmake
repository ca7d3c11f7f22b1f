# Cross-compiles custom_ops for 64-bit Arm Linux with Debian's GNU cross toolchain
# (apt-get install g++-aarch64-linux-gnu; the sysroot is /usr/aarch64-linux-gnu).
#   cmake -S custom_ops -B build-aarch64 \
#         -DCMAKE_TOOLCHAIN_FILE=custom_ops/toolchains/aarch64-linux-gnu.cmake
# BMOE_CROSS_PREFIX overrides the tool prefix (default aarch64-linux-gnu-),
# BMOE_CROSS_SYSROOT the target root (default /usr/aarch64-linux-gnu).
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT BMOE_CROSS_PREFIX)
  set(BMOE_CROSS_PREFIX aarch64-linux-gnu-)
endif()
if(NOT BMOE_CROSS_SYSROOT)
  set(BMOE_CROSS_SYSROOT /usr/aarch64-linux-gnu)
endif()
# try_compile projects re-read this file: pass the two settings on to them.
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES BMOE_CROSS_PREFIX BMOE_CROSS_SYSROOT)

set(CMAKE_C_COMPILER ${BMOE_CROSS_PREFIX}gcc)
set(CMAKE_CXX_COMPILER ${BMOE_CROSS_PREFIX}g++)

# Debian's cross compiler already knows its sysroot; only look there for target
# libraries and headers, never on the build machine.
set(CMAKE_FIND_ROOT_PATH ${BMOE_CROSS_SYSROOT})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)

# Lets `ctest`/custom targets run target binaries through user-mode emulation.
find_program(BMOE_QEMU_AARCH64 qemu-aarch64)
if(BMOE_QEMU_AARCH64)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${BMOE_QEMU_AARCH64} -L ${BMOE_CROSS_SYSROOT})
endif()
