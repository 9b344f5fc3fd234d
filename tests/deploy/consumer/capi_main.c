/* The C ABI of an installed celo2 (celo2::capi, libcelo2.so): prints its version. */
#include <stdio.h>

#include "celo2/celo2.h"

int main(void) {
  int major = -1, minor = -1, patch = -1, abi = -1;
  if (celo2_version(&major, &minor, &patch, &abi) != 0) return 1;
  printf("capi consumer ok version %d.%d.%d abi %d\n", major, minor, patch, abi);
  return 0;
}
