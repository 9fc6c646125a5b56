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

// Affine-quantized variants (bits 4 or 8; w = scale * code + bias with one
// scale and bias per group_size inputs, codes packed 32/bits per uint32).
// "qspvmm": as sparse_in_gemv on the input-major re-layout: wq [in, out/per]
//   holds each input channel's codes for all outputs; scales and biases are
//   [in / group_size, out], dtype of x.
mx::array sparse_in_qgemv(
    const mx::array& x,
    const mx::array& wq,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& threshold,
    int group_size,
    int bits,
    mx::StreamOrDevice s = {});

// "qvmmsp": as sparse_out_gate_gemv on MLX's own QuantizedLinear layout:
//   wq [out, in/per], scales and biases [out, in / group_size].
mx::array sparse_out_gate_qgemv(
    const mx::array& x,
    const mx::array& wq,
    const mx::array& scales,
    const mx::array& biases,
    const mx::array& gate,
    const mx::array& threshold,
    int group_size,
    int bits,
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

// The quantized primitives carry (group_size, bits).
class QuantizedPrimitive : public mx::Primitive {
 public:
  QuantizedPrimitive(mx::Stream stream, int group_size, int bits)
      : mx::Primitive(stream), group_size_(group_size), bits_(bits) {}

  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const QuantizedPrimitive&>(other);
    return group_size_ == o.group_size_ && bits_ == o.bits_;
  }

 protected:
  int group_size_;
  int bits_;
};

class SparseInQGemv : public QuantizedPrimitive {
 public:
  using QuantizedPrimitive::QuantizedPrimitive;
  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "SparseInQGemv";
  }
};

class SparseOutGateQGemv : public QuantizedPrimitive {
 public:
  using QuantizedPrimitive::QuantizedPrimitive;
  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "SparseOutGateQGemv";
  }
};

} // namespace chess_mlx
