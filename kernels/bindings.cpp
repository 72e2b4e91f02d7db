// The Python module mmssm._ext: the bindings of the CPU kernels, which
// mmssm/ops calls (the ops check the user's input; the kernels check their
// own contract).
#include <torch/extension.h>

#include "causal_conv1d/causal_conv1d_cpu.h"
#include "selective_scan/selective_scan_cpu.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() =
      "mmssm compiled ops (CPU): the aligned selective scan and the "
      "position-aware causal conv1d";
  m.def("selective_scan_fwd", &mmssm::selective_scan_fwd,
        "aligned selective scan, forward (CPU): out, checkpoints",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("Bt"),
        py::arg("Ct"), py::arg("D"), py::arg("z"), py::arg("delta_bias"),
        py::arg("positions"), py::arg("order"), py::arg("softplus"),
        py::arg("gap_mode"), py::arg("reverse"), py::arg("checkpoints"),
        py::arg("delta_proj") = py::none());
  // the checkpoints' chunk (mmssm/ops/selective_scan.py checks it)
  m.attr("scan_chunk") = mmssm::kScanChunk;
  // selective_scan_fwd/bwd take delta_proj (mmssm/ops/selective_scan.py
  // checks it: a build of older sources has another signature)
  m.attr("scan_delta_proj") = true;
  m.def("selective_scan_bwd", &mmssm::selective_scan_bwd,
        "aligned selective scan, backward (CPU): du, ddelta, dA, dBt, dCt, "
        "dD, dz, ddelta_bias",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("Bt"),
        py::arg("Ct"), py::arg("D"), py::arg("z"), py::arg("delta_bias"),
        py::arg("positions"), py::arg("order"), py::arg("dout"),
        py::arg("softplus"), py::arg("gap_mode"), py::arg("reverse"),
        py::arg("checkpoints"), py::arg("delta_proj") = py::none());
  m.def("causal_conv1d_fwd", &mmssm::causal_conv1d_fwd,
        "depthwise causal conv1d, optionally position-aware, reversed and "
        "with SiLU, forward (CPU)",
        py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("positions"), py::arg("silu"), py::arg("reverse"));
  m.def("causal_conv1d_bwd", &mmssm::causal_conv1d_bwd,
        "depthwise causal conv1d, backward (CPU): dx, dweight, dbias",
        py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("positions"), py::arg("dout"), py::arg("silu"),
        py::arg("reverse"));
}
