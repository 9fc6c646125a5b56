// MLX ops + primitives for CHESS-style sparse GEMVs on the CPU (decode,
// batch of one row). Modelled on MLX's examples/extensions (axpby).
#pragma once

#include <string>

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace chess_mlx {

// "spvmm": y[o] = sum_i (|x_i| >= t_i ? x_i : 0) * wt[i, o]
//   x: [in] or [..., in] with a single row; wt: [in, out] (transposed
//   nn.Linear weight); threshold: float32 of size 1 or in.
//   Result: x.shape[:-1] + [out], dtype of x. Rows of wt belonging to
//   dropped channels are never read.
mx::array sparse_in_gemv(
    const mx::array& x,
    const mx::array& wt,
    const mx::array& threshold,
    mx::StreamOrDevice s = {});

// "vmmsp": y[o] = |gate_o| >= t_o ? gate_o * dot(w[o, :], x) : 0
//   x: [in] or [..., in] with a single row; w: [out, in] (nn.Linear
//   weight); gate: out elements (activated gate); threshold: float32 of size
//   1 or out. Result: x.shape[:-1] + [out]. Dropped rows of w are not read.
mx::array sparse_out_gate_gemv(
    const mx::array& x,
    const mx::array& w,
    const mx::array& gate,
    const mx::array& threshold,
    mx::StreamOrDevice s = {});

// Name of the kernel instruction set in use ("avx2" or "generic").
std::string kernel_isa();

class SparseInGemv : public mx::Primitive {
 public:
  explicit SparseInGemv(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "SparseInGemv";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class SparseOutGateGemv : public mx::Primitive {
 public:
  explicit SparseOutGateGemv(mx::Stream stream) : mx::Primitive(stream) {}

  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;

  const char* name() const override {
    return "SparseOutGateGemv";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

} // namespace chess_mlx
