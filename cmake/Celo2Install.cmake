# Install rules and the CMake/pkg-config packages of celo2 (included from the top-level
# CMakeLists.txt). `cmake --install BUILD --prefix PREFIX` gives:
#   PREFIX/include/celo2/*.h                 headers of the kernels, the engine and the C ABI
#   PREFIX/lib/libcelo2_{kernels,server}.a   the optimizer and the sharded engine
#   PREFIX/lib/libcelo2.so*                  the C ABI (celo2_* symbols only)
#   PREFIX/bin/celo2-{train,tool},celo2ctl   the tools
#   PREFIX/lib/cmake/celo2/                  find_package(celo2): celo2::kernels,
#                                            celo2::server, celo2::capi
#   PREFIX/lib/pkgconfig/celo2.pc            pkg-config --cflags --libs celo2
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

set(CELO2_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/celo2 CACHE STRING
    "Where the celo2 CMake package is installed (relative to the prefix)")

set_target_properties(celo2_kernels PROPERTIES EXPORT_NAME kernels)
set_target_properties(celo2_server PROPERTIES EXPORT_NAME server)
install(TARGETS celo2_kernels celo2_server EXPORT celo2Targets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT dev
  INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/kernels/include/celo2 ${PROJECT_SOURCE_DIR}/server/include/celo2
  DESTINATION ${CMAKE_INSTALL_INCLUDEDIR} COMPONENT dev FILES_MATCHING PATTERN "*.h")

# The C ABI: a shared library whose interface is celo2/celo2.h only.
if(TARGET celo2_capi)
  set_target_properties(celo2_capi PROPERTIES EXPORT_NAME capi)
  install(TARGETS celo2_capi EXPORT celo2Targets
    LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR} COMPONENT runtime NAMELINK_COMPONENT dev
    INCLUDES DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
  install(FILES ${PROJECT_SOURCE_DIR}/client/capi/include/celo2/celo2.h
    DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/celo2 COMPONENT dev)
endif()

foreach(tool celo2-train celo2-tool celo2ctl)
  if(TARGET ${tool})
    install(TARGETS ${tool} RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR} COMPONENT runtime)
  endif()
endforeach()

install(EXPORT celo2Targets NAMESPACE celo2:: DESTINATION ${CELO2_INSTALL_CMAKEDIR} COMPONENT dev)
configure_package_config_file(${CMAKE_CURRENT_LIST_DIR}/celo2Config.cmake.in
  ${PROJECT_BINARY_DIR}/celo2Config.cmake INSTALL_DESTINATION ${CELO2_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/celo2ConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/celo2Config.cmake ${PROJECT_BINARY_DIR}/celo2ConfigVersion.cmake
  DESTINATION ${CELO2_INSTALL_CMAKEDIR} COMPONENT dev)

# pkg-config: the static libraries need their private dependencies on the link line, so
# they are listed in Requires/Libs (not *.private) and `pkg-config --libs celo2` links.
set(CELO2_PC_BLAS_LIBS "")
foreach(lib ${BLAS_LIBRARIES})
  if(lib MATCHES "^-")
    string(APPEND CELO2_PC_BLAS_LIBS " ${lib}")
  elseif(lib MATCHES "\\.so\\.[0-9]+$")
    # A versioned library linked by path (OpenBLAS's OpenMP build): -lNAME would find the
    # system's default build instead, so the path and its directory go on the line.
    get_filename_component(dir ${lib} DIRECTORY)
    string(APPEND CELO2_PC_BLAS_LIBS " ${lib} -Wl,-rpath,${dir}")
  elseif(lib MATCHES "/lib([^/]+)\\.(so|a)")
    string(APPEND CELO2_PC_BLAS_LIBS " -l${CMAKE_MATCH_1}")
  endif()
endforeach()
set(CELO2_PC_OPENMP_FLAGS "${OpenMP_CXX_FLAGS}")
# Relocatable: the prefix is found from the .pc file's own directory (${pcfiledir}).
file(RELATIVE_PATH CELO2_PC_UP /celo2-prefix/${CMAKE_INSTALL_LIBDIR}/pkgconfig /celo2-prefix)
string(REGEX REPLACE "/$" "" CELO2_PC_UP "${CELO2_PC_UP}")
configure_file(${CMAKE_CURRENT_LIST_DIR}/celo2.pc.in ${PROJECT_BINARY_DIR}/celo2.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/celo2.pc
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig COMPONENT dev)
