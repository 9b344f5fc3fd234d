// One Newton–Schulz iteration (spec/celo2.md §3 step 9) as the column-major, strided-batched
// GEMMs newton_schulz.cu hands to cuBLAS. Host-only and free of CUDA headers: the GEMM and the
// copy are callbacks, so tests/unit/rule_layout_test.cc runs the very same calls through a host
// GEMM with cuBLAS's semantics and checks the operand order and leading dimensions against
// celo2::newton_schulz().
//
// Derivation. cuBLAS reads an array with leading dimension ld as a column-major matrix:
// element (i, j) at [i + j*ld]. A row-major p×q matrix M (element (i, j) at [i*q + j]) read
// column-major with ld = q is therefore the q×p matrix Mᵀ. No data is ever transposed.
//
// rows <= cols (not transposed): r = rows, c = cols, and the iterate X (r×c, row-major, the
// spec's X) is in memory the column-major c×r matrix Xc = Xᵀ, ld c.
//   A = X Xᵀ = Xcᵀ Xc                r×r:  gemm(T, N, m=r, n=r, k=c, Xc ld c, Xc ld c), A ld r
//   B = b A + c A²                    r×r:  gemm(N, N, r, r, r, alpha=c, A, A, beta=b, B := A)
//   Y = a X + B X  <=>  Yc = a Xc + Xc Bᵀ   c×r: gemm(N, T, m=c, n=r, k=r, Xc ld c, B ld r,
//                                               beta=a, Yc := Xc, ld c)
//   (A and B are symmetric, so their row- and column-major readings are the same matrix and
//   Bᵀ = B; the T on B costs nothing and keeps the derivation literal.)
// rows > cols (transposed): the spec works on M = xᵀ, r = cols, c = rows. x is row-major
// c×r (ld r), so read column-major with ld r it is exactly M (r×c):
//   A = M Mᵀ                          r×r:  gemm(N, T, m=r, n=r, k=c, M ld r, M ld r), A ld r
//   B = b A + c A²                    as above
//   Y = a M + B M                     r×c:  gemm(N, N, m=r, n=c, k=r, B ld r, M ld r,
//                                               beta=a, Y := M, ld r)
//   and the result, column-major r×c with ld r, is in memory the row-major c×r = rows×cols
//   matrix Mᵀ: the transpose back is free as well.
// Every GEMM is strided-batched: matrix i of an operand starts at i·(r·c) (X, Y) or i·(r·r)
// (A, B).
#pragma once

#include <cstddef>
#include <cstdint>

namespace celo2::cuda {

struct NsShape {
  bool transposed;     // rows > cols: the iteration runs on the transpose
  int64_t r, c;        // r <= c: the iterate is r×c
  int64_t rc, rr;      // r*c, r*r: batch strides
  static NsShape of(int64_t rows, int64_t cols) {
    NsShape s;
    s.transposed = rows > cols;
    s.r = s.transposed ? cols : rows;
    s.c = s.transposed ? rows : cols;
    s.rc = s.r * s.c;
    s.rr = s.r * s.r;
    return s;
  }
};

// One iteration: reads X, overwrites A and B, writes the new iterate into Y (the caller swaps
// X and Y). gemm(trans_a, trans_b, m, n, k, alpha, A, lda, strideA, B, ldb, strideB, beta, C,
// ldc, strideC, batch) has cublasSgemmStridedBatched's meaning (column-major, C = alpha
// op(A) op(B) + beta C); copy(dst, src, count) copies `count` elements.
template <class T, class Gemm, class Copy>
void ns_iteration(const NsShape& s, int batch, float a, float b, float c, T* X, T* Y, T* A,
                  T* B, Gemm&& gemm, Copy&& copy) {
  const int R = static_cast<int>(s.r), Cc = static_cast<int>(s.c);
  const long long rc = s.rc, rr = s.rr;
  if (!s.transposed)  // A = Xcᵀ Xc, Xc is c×r (ld c)
    gemm(true, false, R, R, Cc, 1.0f, X, Cc, rc, X, Cc, rc, 0.0f, A, R, rr, batch);
  else  // A = M Mᵀ, M is r×c (ld r)
    gemm(false, true, R, R, Cc, 1.0f, X, R, rc, X, R, rc, 0.0f, A, R, rr, batch);
  copy(B, A, static_cast<size_t>(batch) * rr);  // B = b A + c A A
  gemm(false, false, R, R, R, c, A, R, rr, A, R, rr, b, B, R, rr, batch);
  copy(Y, X, static_cast<size_t>(batch) * rc);
  if (!s.transposed)  // Yc = a Xc + Xc Bᵀ
    gemm(false, true, Cc, R, R, 1.0f, X, Cc, rc, B, R, rr, a, Y, Cc, rc, batch);
  else  // Y = a M + B M
    gemm(false, false, R, Cc, R, 1.0f, B, R, rr, X, R, rc, a, Y, R, rc, batch);
}

}  // namespace celo2::cuda
