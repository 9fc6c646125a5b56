// Fused CPU ops for the rest of a decode step: RMS norm, RoPE at one
// position, attention of one query over the KV cache, and SiLU. On MLX's
// CPU backend each of mx.fast.rms_norm, mx.fast.rope and
// mx.fast.scaled_dot_product_attention falls back to a graph of 5 to 15
// small ops; dispatching those costs more than their arithmetic at decode.
// nn.silu compiles to a scalar loop (an exp and a libm fma call a value).
// Each op here is one node computing the same function (float32 inside,
// rounded to the input dtype where MLX's fallback rounds).
#pragma once

#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;

namespace chess_mlx {

// y = round(x * rsqrt(mean(x^2) + eps)) * w over the last axis (rows of any
// count; w has the dtype of x).
mx::array rms_norm(
    const mx::array& x,
    const mx::array& w,
    float eps,
    mx::StreamOrDevice s = {});

// mx.fast.rope of a single position: every row of x (last axis: one head)
// rotated by the angles offset * scale * inv_freqs ([dims / 2] float32); the
// entries past dims pass through.
mx::array rope_one(
    const mx::array& x,
    const mx::array& inv_freqs,
    int offset,
    float scale,
    bool traditional,
    mx::StreamOrDevice s = {});

// Attention of one query per head, no mask: q [B, 1, Hq, D] (row-major),
// k and v [B, Hkv, S, D] (any strides but a unit last one, e.g. views of a
// KV cache), Hq a multiple of Hkv (grouped queries). Returns [B, 1, Hq, D].
mx::array attention_one(
    const mx::array& q,
    const mx::array& k,
    const mx::array& v,
    float scale,
    mx::StreamOrDevice s = {});

// nn.silu(x) = x * sigmoid(x), sigmoid computed in float32 and stored in
// the dtype of x (as MLX stores it), through a vectorizable exp.
mx::array silu(const mx::array& x, mx::StreamOrDevice s = {});

class Silu : public mx::Primitive {
 public:
  explicit Silu(mx::Stream stream) : mx::Primitive(stream) {}
  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "Silu";
  }
  bool is_equivalent(const mx::Primitive&) const override {
    return true;
  }
};

class RmsNormOne : public mx::Primitive {
 public:
  RmsNormOne(mx::Stream stream, float eps) : mx::Primitive(stream), eps_(eps) {}
  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "RmsNormOne";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return eps_ == static_cast<const RmsNormOne&>(other).eps_;
  }

 private:
  float eps_;
};

class RopeOne : public mx::Primitive {
 public:
  RopeOne(mx::Stream stream, int offset, float scale, bool traditional)
      : mx::Primitive(stream),
        offset_(offset),
        scale_(scale),
        traditional_(traditional) {}
  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "RopeOne";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& o = static_cast<const RopeOne&>(other);
    return offset_ == o.offset_ && scale_ == o.scale_ &&
        traditional_ == o.traditional_;
  }

 private:
  int offset_;
  float scale_;
  bool traditional_;
};

class AttentionOne : public mx::Primitive {
 public:
  AttentionOne(mx::Stream stream, float scale)
      : mx::Primitive(stream), scale_(scale) {}
  void eval_cpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  void eval_gpu(
      const std::vector<mx::array>& inputs,
      std::vector<mx::array>& outputs) override;
  const char* name() const override {
    return "AttentionOne";
  }
  bool is_equivalent(const mx::Primitive& other) const override {
    return scale_ == static_cast<const AttentionOne&>(other).scale_;
  }

 private:
  float scale_;
};

} // namespace chess_mlx
