"""CPU emulator for MLX-generated Metal kernels (``mx.fast.metal_kernel``).

The exact source MLX generates for a call (``chess_mlx.kernels.generated_metal_source``)
is rewritten lightly (attributes stripped, ``threadgroup`` arrays made shared),
compiled with g++ against ``metal_shim.h`` together with a small generated
``main`` and run as a separate process: inputs are written as raw files,
outputs read back.  Every thread of a threadgroup is a cooperative fiber; they
meet at threadgroup barriers and at simd collectives (SIMD width 32).  Grid
sizes count threads, the threadgroup is clipped to the grid as MLX does and the
last threadgroup may be partial.  Binaries are cached by a hash of (shim,
harness, source, flags) under ``$CHESS_MLX_EMULATOR_CACHE`` or
``~/.cache/chess_mlx/metal_emulator`` (a temporary directory if neither is
writable), so each distinct source is compiled once.

What the emulator checks beyond the numbers:
  * every input/output buffer ends at (``align="end"``) or starts at
    (``align="start"``) an inaccessible page: out-of-bounds reads/writes past
    the end (or before the start) abort the run with the offending thread;
  * outputs start as 0xFF bytes (NaN) so an output element that is never
    written shows up; ``threadgroup`` arrays are poisoned the same way before
    every threadgroup, so reads of unwritten threadgroup memory show up;
  * divergence: lanes of a simdgroup waiting at different collectives, a
    barrier that some threads of the threadgroup never reach, deadlocks;
  * ``order="reverse"|"random"`` runs the fibers between synchronisation points
    in another order, which exposes most missing barriers.

What it cannot catch (verify on a Mac):
  * Metal compile errors and MSL-only rules: g++ accepts C++17 that the Metal
    compiler rejects (and vice versa); address-space qualifiers are empty
    macros, so mixing ``device``/``constant``/``threadgroup`` pointers, or
    casting a ``constant`` input to a ``device`` pointer, is not diagnosed;
    MLX's ``metal::utils()`` preamble (metal_stdlib, bf16 helpers) is replaced
    by the shim, so name clashes with it are not seen;
  * performance: coalescing, bank conflicts, occupancy, register pressure,
    threadgroup-memory limits other than static sizes, vectorisation;
  * true concurrency: threads run one at a time between synchronisation points,
    so races between threads of one threadgroup that do not depend on order,
    races between threadgroups (they run one after another), memory-ordering
    and atomics semantics, and missing ``mem_flags`` are not seen;
  * divergent simd collectives whose active lanes are a proper subset chosen
    by control flow (here all running lanes must take part), and the exact
    inactive-lane / reduction-order behaviour of the hardware (simd_sum adds in
    lane order here; the GPU uses a tree);
  * floating point details of the GPU: fast-math/fma contraction choices,
    half arithmetic done in half (the shim's ``half`` is ``_Float16`` whose
    arithmetic g++ may evaluate in float), denormal flushing, and transcendental
    accuracy; only conversions (round to nearest even) are exact;
  * the real values of the threadgroup attributes for non-uniform dispatches
    are modelled after the MSL spec, not observed.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

HERE = Path(__file__).resolve().parent
SHIM = HERE / "metal_shim.h"
CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O1", "-w", "-U_FORTIFY_SOURCE", "-fno-strict-aliasing"]

ATTRIBUTES = [
    "dispatch_quadgroups_per_threadgroup",
    "dispatch_simdgroups_per_threadgroup",
    "dispatch_threads_per_threadgroup",
    "grid_origin",
    "grid_size",
    "quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup",
    "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup",
    "thread_execution_width",
    "thread_index_in_quadgroup",
    "thread_index_in_simdgroup",
    "thread_index_in_threadgroup",
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threadgroups_per_grid",
    "threads_per_grid",
    "threads_per_simdgroup",
    "threads_per_threadgroup",
]

_ATTR_RE = re.compile(
    r"\[\[\s*(?:kernel|host_name\(\"[^\"]*\"\)|buffer\(\d+\)|threadgroup\(\d+\)|"
    + "|".join(ATTRIBUTES)
    + r")\s*\]\]"
)
# `threadgroup T name[N]...;` at statement start -> shared static array.
_TG_ARRAY_RE = re.compile(
    r"(?m)^(\s*)threadgroup\s+([A-Za-z_][\w:<>, ]*?)\s+([A-Za-z_]\w*)\s*((?:\[[^\]\n]+\])+)\s*;"
)
_ADDRESS_SPACES = re.compile(r"\b(device|constant|threadgroup|thread)\b")


class EmulatorError(RuntimeError):
    """Compilation failure, invalid memory access, divergence or deadlock."""


class Param:
    def __init__(self, text: str):
        self.text = text.strip()
        decl = _ATTR_RE.sub("", self.text).strip()
        m = re.match(r"^(.*?)([A-Za-z_]\w*)$", decl)
        if not m:
            raise EmulatorError(f"cannot parse kernel parameter: {text!r}")
        self.ctype = _ADDRESS_SPACES.sub("", m.group(1)).strip()
        self.ctype = re.sub(r"\s+", " ", self.ctype)
        self.name = m.group(2)
        attr = re.search(r"\[\[\s*(\w+)", self.text)
        self.is_attribute = attr is not None and attr.group(1) in ATTRIBUTES
        self.is_reference = self.ctype.endswith("&")

    def call_expr(self, buf_index: int) -> str:
        if self.is_attribute:
            return f"a.{self.name}"
        if self.is_reference:
            base = self.ctype[:-1].strip()
            return f"*({base}*)H.buf[{buf_index}]"
        return f"({self.ctype})H.buf[{buf_index}]"


class ParsedKernel:
    """The pieces of an MLX-generated kernel source the harness needs."""

    def __init__(self, source: str):
        m = re.search(r"\[\[kernel\]\]\s+void\s+(\w+)\s*\(", source)
        if not m:
            raise EmulatorError("no [[kernel]] function in source")
        self.name = m.group(1)
        start = m.end()
        end = source.index(") {\n", start)
        params = [p for p in source[start:end].split(",\n") if p.strip()]
        self.params = [Param(p) for p in params]
        inst = re.search(r"decltype\(" + self.name + r"(<[^;]*?>)\)", source)
        self.template_args = inst.group(1) if inst else ""
        self.buffers = [p for p in self.params if not p.is_attribute]

    @staticmethod
    def rewrite(source: str) -> str:
        out = _ATTR_RE.sub("", source)
        out = _TG_ARRAY_RE.sub(
            lambda m: f"{m.group(1)}static {m.group(2)} {m.group(3)}{m.group(4)}; "
            f"::emu::tg_register({m.group(3)}, sizeof({m.group(3)}));",
            out,
        )
        return out


HARNESS = r"""
#undef device
#undef constant
#undef threadgroup
#undef thread
namespace emu {
// manifest: "grid gx gy gz", "tg tx ty tz", "order n", "seed n", "align end|start",
// then one line per buffer: "buf <index> <nbytes> <in-path or -> <out-path or ->"
constexpr int kMaxBuffers = 31;
struct Harness {
  uint3 grid{1u, 1u, 1u}, tg{1u, 1u, 1u};
  bool align_end = true;
  int nbuf = 0;
  void* buf[kMaxBuffers] = {};
  Guarded g[kMaxBuffers];
  size_t size[kMaxBuffers] = {};
  char outp[kMaxBuffers][512] = {};
  explicit Harness(const char* manifest) {
    FILE* f = std::fopen(manifest, "r");
    if (!f) fail("cannot open manifest");
    char key[16], inp[kMaxBuffers][512] = {};
    while (std::fscanf(f, "%15s", key) == 1) {
      if (!std::strcmp(key, "grid")) std::fscanf(f, "%u %u %u", &grid.x, &grid.y, &grid.z);
      else if (!std::strcmp(key, "tg")) std::fscanf(f, "%u %u %u", &tg.x, &tg.y, &tg.z);
      else if (!std::strcmp(key, "order")) std::fscanf(f, "%d", &R.order);
      else if (!std::strcmp(key, "seed")) {
        unsigned long long s;
        std::fscanf(f, "%llu", &s);
        R.rng = 0x9E3779B97F4A7C15ull ^ (s * 0xBF58476D1CE4E5B9ull);
        if (!R.rng) R.rng = 1;
      } else if (!std::strcmp(key, "align")) {
        char a[16];
        std::fscanf(f, "%15s", a);
        align_end = !std::strcmp(a, "end");
      } else if (!std::strcmp(key, "buf")) {
        int i;
        size_t n;
        std::fscanf(f, "%d %zu", &i, &n);
        if (i < 0 || i >= kMaxBuffers) fail("bad buffer index");
        std::fscanf(f, "%511s %511s", inp[i], outp[i]);
        size[i] = n;
        if (i + 1 > nbuf) nbuf = i + 1;
      } else fail("bad manifest");
    }
    std::fclose(f);
    for (int i = 0; i < nbuf; i++) {
      g[i] = guarded_alloc(size[i], align_end);
      buf[i] = g[i].p;
      if (std::strcmp(inp[i], "-")) {
        FILE* in = std::fopen(inp[i], "rb");
        if (!in || std::fread(buf[i], 1, size[i], in) != size[i]) fail("short input file");
        std::fclose(in);
      } else {
        std::memset(buf[i], 0xFF, size[i]);  // poison outputs
      }
    }
  }
  void write_outputs() {
    for (int i = 0; i < nbuf; i++) {
      if (!canary_intact(g[i])) {
        std::fprintf(stderr, "EMULATOR ERROR: invalid memory access: out-of-bounds write next to buffer %d\n", i);
        std::_Exit(3);
      }
    }
    for (int i = 0; i < nbuf; i++) {
      if (!std::strcmp(outp[i], "-")) continue;
      FILE* o = std::fopen(outp[i], "wb");
      if (!o || std::fwrite(buf[i], 1, size[i], o) != size[i]) fail("cannot write output");
      std::fclose(o);
    }
  }
};
}  // namespace emu
"""


def translation_unit(source: str) -> str:
    pk = ParsedKernel(source)
    call_args = []
    bi = 0
    for p in pk.params:
        if p.is_attribute:
            call_args.append(p.call_expr(-1))
        else:
            call_args.append(p.call_expr(bi))
            bi += 1
    call = f"{pk.name}{pk.template_args}(\n      " + ",\n      ".join(call_args) + ")"
    main = f"""
int main(int argc, char** argv) {{
  if (argc != 2) {{ std::fprintf(stderr, "usage: %s manifest\\n", argv[0]); return 1; }}
  emu::install_segv_handler();
  emu::Harness H(argv[1]);
  auto body = [&](const emu::ThreadAttrs& a) {{
    (void)a;
    {call};
  }};
  emu::launch(H.grid, H.tg, body);
  H.write_outputs();
  std::fprintf(stderr, "syncs %lld\\n", emu::R.syncs);
  return 0;
}}
"""
    return (
        '#include "metal_shim.h"\n'
        + "#line 1 \"generated.metal\"\n"
        + ParsedKernel.rewrite(source)
        + "\n"
        + HARNESS
        + main
    )


def cache_dir() -> Path:
    env = os.environ.get("CHESS_MLX_EMULATOR_CACHE")
    candidates = [Path(env)] if env else []
    candidates.append(Path.home() / ".cache" / "chess_mlx" / "metal_emulator")
    candidates.append(Path(tempfile.gettempdir()) / "chess_mlx_metal_emulator")
    for c in candidates:
        try:
            c.mkdir(parents=True, exist_ok=True)
            probe = c / f".probe{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            return c
        except OSError:
            continue
    raise EmulatorError("no writable cache directory for emulator binaries")


def _digest(source: str) -> str:
    h = hashlib.sha256()
    for part in (SHIM.read_bytes(), HARNESS.encode(), source.encode(), " ".join([CXX] + CXXFLAGS).encode()):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:24]


def build(source: str) -> Path:
    """Compile (once, cached) the emulator binary for an MLX-generated source."""
    exe = cache_dir() / f"kernel_{_digest(source)}"
    if exe.exists():
        return exe
    tu = translation_unit(source)
    with tempfile.TemporaryDirectory() as d:
        cpp = Path(d) / "kernel.cpp"
        cpp.write_text(tu)
        tmp_exe = Path(d) / "kernel"
        r = subprocess.run(
            [CXX, *CXXFLAGS, "-I", str(HERE), str(cpp), "-o", str(tmp_exe)],
            capture_output=True,
            text=True,
        )
        if r.returncode != 0:
            raise EmulatorError(f"g++ failed:\n{r.stderr[-6000:]}")
        # Atomic publish (several test processes may build the same binary).
        staged = exe.with_name(exe.name + f".{os.getpid()}.tmp")
        staged.write_bytes(tmp_exe.read_bytes())
        staged.chmod(0o755)
        os.replace(staged, exe)
    return exe


def build_many(sources: Sequence[str], workers: int = 2) -> List[Path]:
    """Compile several sources in parallel (g++ processes)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(build, sources))


_ORDERS = {"forward": 0, "reverse": 1, "random": 2}


def run(
    source: str,
    buffers: Dict[str, np.ndarray],
    outputs: Dict[str, Tuple[Tuple[int, ...], np.dtype]],
    grid: Tuple[int, int, int],
    threadgroup: Tuple[int, int, int],
    order: str = "forward",
    seed: int = 0,
    align: str = "end",
    timeout: float = 300.0,
) -> Dict[str, np.ndarray]:
    """Run a kernel on the emulator.

    ``buffers`` maps every non-output buffer parameter of the generated
    signature (inputs and MLX's ``<name>_shape`` / ``_strides`` / ``_ndim``
    buffers) to a numpy array holding its bytes; ``outputs`` maps output names
    to (shape, numpy dtype). Returns the outputs.
    """
    pk = ParsedKernel(source)
    exe = build(source)
    with tempfile.TemporaryDirectory() as d:
        lines = [
            "grid %d %d %d" % tuple(grid),
            "tg %d %d %d" % tuple(threadgroup),
            f"order {_ORDERS[order]}",
            f"seed {int(seed)}",
            f"align {align}",
        ]
        out_paths = {}
        for i, p in enumerate(pk.buffers):
            if p.name in outputs:
                shape, dt = outputs[p.name]
                nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
                path = os.path.join(d, f"out{i}.bin")
                out_paths[p.name] = path
                lines.append(f"buf {i} {nbytes} - {path}")
            else:
                if p.name not in buffers:
                    raise EmulatorError(f"no data for kernel buffer {p.name!r}")
                arr = np.ascontiguousarray(buffers[p.name])
                path = os.path.join(d, f"in{i}.bin")
                arr.tofile(path)
                lines.append(f"buf {i} {arr.nbytes} {path} -")
        manifest = os.path.join(d, "manifest.txt")
        Path(manifest).write_text("\n".join(lines) + "\n")
        r = subprocess.run([str(exe), manifest], capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise EmulatorError(
                f"emulated kernel failed (exit {r.returncode}):\n{r.stderr[-4000:]}"
            )
        result = {}
        for name, path in out_paths.items():
            shape, dt = outputs[name]
            result[name] = np.fromfile(path, dtype=dt).reshape(shape)
        return result


# ---------------------------------------------------------------------------
# MLX glue
# ---------------------------------------------------------------------------
def _to_numpy_bytes(a) -> np.ndarray:
    """mx.array -> numpy array with the same bytes (bfloat16 as uint16)."""
    import mlx.core as mx

    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def _np_dtype(dtype) -> np.dtype:
    import mlx.core as mx

    return {
        mx.float16: np.dtype(np.float16),
        mx.bfloat16: np.dtype(np.uint16),
        mx.float32: np.dtype(np.float32),
        mx.int32: np.dtype(np.int32),
        mx.uint32: np.dtype(np.uint32),
    }[dtype]


def emulate(source, input_names, inputs, output_names, output_shapes, output_dtypes,
             grid, threadgroup, **run_kwargs):
    """Run an MLX-generated source on MLX arrays; returns a list of mx.arrays.

    MLX's launch rules are applied: inputs are made row-contiguous and
    ``<name>_shape`` / ``_strides`` / ``_ndim`` buffers are filled from them.
    """
    import mlx.core as mx

    buffers = {}
    for name, a in zip(input_names, inputs):
        buffers[name] = _to_numpy_bytes(a)
        buffers[name + "_shape"] = np.array(a.shape, dtype=np.int32)
        strides = [int(np.prod(a.shape[i + 1 :], dtype=np.int64)) for i in range(a.ndim)]
        buffers[name + "_strides"] = np.array(strides, dtype=np.int64)
        buffers[name + "_ndim"] = np.array([a.ndim], dtype=np.int32)
    outputs = {
        name: (tuple(shape), _np_dtype(dt))
        for name, shape, dt in zip(output_names, output_shapes, output_dtypes)
    }
    res = run(source, buffers, outputs, tuple(grid), tuple(threadgroup), **run_kwargs)
    out = []
    for name, dt in zip(output_names, output_dtypes):
        arr = mx.array(res[name])
        out.append(arr.view(mx.bfloat16) if dt == mx.bfloat16 else arr)
    return out


def emulate_spec(spec, source: Optional[str] = None, **run_kwargs):
    """Run a ``chess_mlx.kernels.LaunchSpec`` on the emulator; returns mx.arrays."""
    from chess_mlx import kernels

    if source is None:
        source = kernels.generated_metal_source(spec)
    return emulate(source, spec.input_names, spec.inputs, spec.output_names,
                   spec.output_shapes, spec.output_dtypes, spec.grid, spec.threadgroup,
                   **run_kwargs)


def emulate_kernel(kernel, input_names, inputs, output_names, output_shapes, output_dtypes,
                   grid, threadgroup, template=(), **run_kwargs):
    """Generate the source of any ``mx.fast.metal_kernel`` call and emulate it.

    Returns (outputs, source).
    """
    from chess_mlx.kernels import capture_generated_source

    def traced(*arrs):
        return kernel(inputs=list(arrs), template=list(template), grid=tuple(grid),
                      threadgroup=tuple(threadgroup), output_shapes=list(output_shapes),
                      output_dtypes=list(output_dtypes), stream=mx_gpu(), verbose=True)

    source = capture_generated_source(traced, *inputs)
    outs = emulate(source, input_names, inputs, output_names, output_shapes, output_dtypes,
                   grid, threadgroup, **run_kwargs)
    return outs, source


def mx_gpu():
    import mlx.core as mx

    return mx.gpu
