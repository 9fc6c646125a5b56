"""An exact input-major re-layout of MLX's affine-quantized linears.

``nn.QuantizedLinear`` stores ``W [out, in]`` as ``bits``-bit codes packed
along ``in`` (``32 / bits`` per uint32) with one scale and bias per
``group_size`` inputs of each row: ``W[o, i] = s[o, i // gs] * q[o, i] +
b[o, i // gs]``. An input-sparse GEMV skips input channels, i.e. columns,
which the stock layout spreads over every row. The re-layout stores channel
``i``'s codes for all outputs together (``wq[i]``, packed along ``out``) and
group ``g``'s scales and biases for all outputs together (``scales[g]``):
the same codes and the same scale and bias values, moved, never re-quantized,
so the memory is the stock layer's and dequantization is bit-identical.
"""

import mlx.core as mx
import mlx.nn as nn

BITS = (4, 8)


def unpack_codes(packed: mx.array, bits: int) -> mx.array:
    """uint32 ``[rows, cols * bits / 32]`` -> uint32 codes ``[rows, cols]``
    (code ``t`` of a word sits at bits ``t * bits``, as MLX packs them)."""
    per = 32 // bits
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(packed.shape[0], -1)


def pack_codes(codes: mx.array, bits: int) -> mx.array:
    """The inverse of :func:`unpack_codes`."""
    per = 32 // bits
    shifts = mx.arange(per, dtype=mx.uint32) * bits
    words = codes.astype(mx.uint32).reshape(codes.shape[0], -1, per) << shifts
    return words.sum(axis=-1).astype(mx.uint32)  # disjoint bits: the sum is an OR


def kernel_quantization(layer: nn.Module) -> bool:
    """A quantized layer (linear or embedding) whose quantization the kernels
    read: affine, 4 or 8 bits."""
    return (
        isinstance(layer, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        and getattr(layer, "mode", "affine") == "affine"
        and layer.bits in BITS
    )


def relayout_ready(linear: nn.Module) -> bool:
    """A kernel-readable QuantizedLinear whose codes can be repacked along outputs."""
    return (
        isinstance(linear, nn.QuantizedLinear)
        and kernel_quantization(linear)
        and linear.weight.shape[0] % (32 // linear.bits) == 0
    )


class QuantizedInputMajorLinear(nn.Module):
    """A QuantizedLinear re-laid input-major (see the module docstring).

    Decode calls :meth:`sparse_gemv`; prompts rebuild the stock layout on the
    fly and use MLX's quantized matmul, so their results equal the stock
    layer's exactly.
    """

    def __init__(self, linear: nn.QuantizedLinear):
        super().__init__()
        self.group_size, self.bits = linear.group_size, linear.bits
        self.wq = pack_codes(unpack_codes(linear.weight, self.bits).T, self.bits)
        self.scales = mx.contiguous(linear.scales.T)
        self.biases = mx.contiguous(linear.biases.T)
        if "bias" in linear:
            self.bias = linear.bias

    def stock_arrays(self):
        """``(weight, scales, biases)`` in QuantizedLinear's own layout."""
        weight = pack_codes(unpack_codes(self.wq, self.bits).T, self.bits)
        return weight, mx.contiguous(self.scales.T), mx.contiguous(self.biases.T)

    def sparse_gemv(self, kernels, x: mx.array, threshold) -> mx.array:
        return kernels.sparse_in_qgemv(
            x, self.wq, self.scales, self.biases, threshold, self.group_size, self.bits
        )

    def __call__(self, x: mx.array) -> mx.array:
        weight, scales, biases = self.stock_arrays()
        y = mx.quantized_matmul(x, weight, scales, biases, transpose=True,
                                group_size=self.group_size, bits=self.bits)
        return y + self.bias if "bias" in self else y

    def to_linear(self) -> nn.QuantizedLinear:
        in_dims = self.wq.shape[0]
        out_dims = self.scales.shape[1]
        linear = nn.QuantizedLinear(in_dims, out_dims, bias="bias" in self,
                                    group_size=self.group_size, bits=self.bits)
        linear.weight, linear.scales, linear.biases = self.stock_arrays()
        if "bias" in self:
            linear.bias = self.bias
        return linear

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for _, v in nn.utils.tree_flatten(self.parameters()))


def bfloat16_exact(a: mx.array) -> bool:
    return mx.array_equal(a.astype(mx.bfloat16).astype(a.dtype), a).item()


class Float32LookupEmbedding(nn.QuantizedEmbedding):
    """A QuantizedEmbedding whose scales and biases :func:`half_scales`
    stored in bfloat16. ``mx.dequantize`` returns the scales' dtype, so a
    lookup widens the rows' scales and biases first and returns the float32
    rows it returned before; as the LM head it reads them as they are."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.dequantize(
            self["weight"][x],
            scales=self["scales"][x].astype(mx.float32),
            biases=self["biases"][x].astype(mx.float32),
            group_size=self.group_size,
            bits=self.bits,
            mode=self.mode,
        )


def half_scales(model: nn.Module) -> int:
    """Store the float32 scales and biases of ``model``'s quantized linears
    and embeddings in bfloat16 where that holds them exactly (a bfloat16
    checkpoint's do); the bytes saved.

    MLX's quantized matmul and the kernels read them with float32
    activations and give the same results, so a bfloat16 checkpoint run in
    float32 on the CPU keeps its smaller layers; embeddings become
    :class:`Float32LookupEmbedding` so that lookups stay float32. float16
    ones stay float32: converting them cost the CPU kernels more than their
    bytes saved (the output GEMV at SmolLM2's shapes, 38 us dense against 32)."""
    saved = 0
    for _, layer in model.named_modules():
        if type(layer) not in (nn.QuantizedLinear, nn.QuantizedEmbedding) or layer.scales.dtype != mx.float32:
            continue
        if "biases" not in layer or getattr(layer, "mode", "affine") != "affine":
            continue
        if bfloat16_exact(mx.concatenate([layer.scales.flatten(), layer.biases.flatten()])):
            saved += (layer.scales.nbytes + layer.biases.nbytes) // 2
            layer.scales, layer.biases = layer.scales.astype(mx.bfloat16), layer.biases.astype(mx.bfloat16)
            if type(layer) is nn.QuantizedEmbedding:
                layer.__class__ = Float32LookupEmbedding
    return saved
