// The engine's "cuda" backend (EngineOptions::backend = "cuda": tensors in device memory,
// the CUDA rule, whole-tensor plan), in CUDA builds (library celo2_cuda_backend). The client
// library registers it; a C++ program that builds an Engine itself calls this once first.
#pragma once

namespace celo2 {
void register_cuda_backend();
}  // namespace celo2
