// The main() of the GoogleTest binaries run under mpirun: one communicator for the whole
// run, only rank 0 prints results (a failure on any rank still fails the run through its
// exit code).
#pragma once

#include <gtest/gtest.h>

#include <memory>

#include "celo2/communicator.h"

namespace celo2::testing {

inline int run_mpi_tests(int argc, char** argv, std::shared_ptr<Communicator>& comm) {
  ::testing::InitGoogleTest(&argc, argv);
  comm = make_communicator("auto");
  if (comm->rank() != 0) {
    auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
    delete listeners.Release(listeners.default_result_printer());
  }
  const int rc = RUN_ALL_TESTS();
  comm->barrier();
  comm.reset();
  return rc;
}

}  // namespace celo2::testing
