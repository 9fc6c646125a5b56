// Helpers shared by the extension's MLX ops: argument checks and errors,
// the CPU stream, and inputs that are not row-contiguous (gathered into a
// dense buffer inside the dispatched task).
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

#include "mlx/allocator.h"
#include "mlx/array.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/stream.h"
#include "mlx/utils.h"

namespace mx = mlx::core;

namespace chess_mlx::op_utils {

inline bool supported_dtype(mx::Dtype d) {
  return d == mx::float32 || d == mx::float16 || d == mx::bfloat16;
}

inline std::string shape_str(const mx::array& a) {
  std::ostringstream os;
  os << "(";
  for (size_t i = 0; i < a.ndim(); ++i) {
    os << (i ? ", " : "") << a.shape(static_cast<int>(i));
  }
  os << (a.ndim() == 1 ? ",)" : ")");
  return os.str();
}

[[noreturn]] inline void fail(const char* op, const std::string& msg) {
  throw std::invalid_argument(std::string("[") + op + "] " + msg);
}

// "[op] name must be float32, float16 or bfloat16" unless it is.
inline void check_float_dtype(
    const char* op,
    const char* name,
    const mx::array& a) {
  if (!supported_dtype(a.dtype())) {
    fail(op, std::string(name) + " must be float32, float16 or bfloat16");
  }
}

// The stream to run on: an explicit CPU stream/device, or the default CPU
// stream. GPU streams are rejected (these kernels are CPU only).
inline mx::Stream cpu_stream(const char* op, mx::StreamOrDevice s) {
  if (std::holds_alternative<std::monostate>(s)) {
    mx::Stream st = mx::to_stream(s);
    return st.device == mx::Device::cpu ? st
                                        : mx::default_stream(mx::Device::cpu);
  }
  mx::Stream st = mx::to_stream(s);
  if (st.device != mx::Device::cpu) {
    fail(op, "only CPU streams/devices are supported");
  }
  return st;
}

// Single-row activation: [n] or [..., n] with all leading dims 1.
inline int64_t single_row_len(const char* op, const char* name, const mx::array& a) {
  if (a.ndim() < 1) {
    fail(op, std::string(name) + " must have at least one dimension");
  }
  const int64_t n = a.shape(-1);
  if (static_cast<int64_t>(a.size()) != n) {
    fail(
        op,
        std::string(name) + " must hold a single row (decode), got shape " +
            shape_str(a));
  }
  return n;
}

// Where an input lives at eval time; not-row-contiguous inputs are gathered
// into a dense buffer inside the dispatched task.
struct Operand {
  const char* ptr;
  bool dense;
  mx::Shape shape;
  mx::Strides strides; // in elements
  int itemsize;
  int64_t size;
};

inline Operand operand(const mx::array& a) {
  return Operand{
      a.size() > 0 ? a.data<char>() : nullptr,
      a.flags().row_contiguous || a.size() <= 1,
      a.shape(),
      a.strides(),
      static_cast<int>(a.itemsize()),
      static_cast<int64_t>(a.size())};
}

template <typename U>
inline void gather(const Operand& o, U* dst) {
  const U* src = reinterpret_cast<const U*>(o.ptr);
  const int nd = static_cast<int>(o.shape.size());
  if (nd == 0) {
    dst[0] = src[0];
    return;
  }
  const int64_t inner = o.shape[nd - 1];
  const int64_t inner_stride = o.strides[nd - 1];
  std::vector<int64_t> pos(nd, 0);
  int64_t n = 0;
  while (n < o.size) {
    int64_t off = 0;
    for (int d = 0; d < nd - 1; ++d) {
      off += pos[d] * o.strides[d];
    }
    for (int64_t j = 0; j < inner; ++j) {
      dst[n++] = src[off + j * inner_stride];
    }
    for (int d = nd - 2; d >= 0; --d) {
      if (++pos[d] < o.shape[d]) {
        break;
      }
      pos[d] = 0;
    }
  }
}

inline const void* materialize(const Operand& o, std::vector<char>& buf) {
  if (o.dense) {
    return o.ptr;
  }
  buf.resize(static_cast<size_t>(o.size) * o.itemsize);
  if (o.itemsize == 4) {
    gather(o, reinterpret_cast<uint32_t*>(buf.data()));
  } else if (o.itemsize == 2) {
    gather(o, reinterpret_cast<uint16_t*>(buf.data()));
  } else {
    throw std::runtime_error("unexpected itemsize");
  }
  return buf.data();
}

// Allocates the output and registers every array with the stream's encoder.
inline mx::cpu::CommandEncoder& prepare(
    const mx::Stream& stream,
    const std::vector<mx::array>& inputs,
    mx::array& y) {
  y.set_data(mx::allocator::malloc(y.nbytes()));
  auto& encoder = mx::cpu::get_command_encoder(stream);
  for (const auto& a : inputs) {
    encoder.set_input_array(a);
  }
  encoder.set_output_array(y);
  return encoder;
}

} // namespace chess_mlx::op_utils
