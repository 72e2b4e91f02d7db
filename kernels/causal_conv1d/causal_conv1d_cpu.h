// Depthwise causal conv1d, optionally position-aware: CPU kernel.
#pragma once

#include <torch/extension.h>

namespace mmssm {

// Adds causal_conv1d_fwd / causal_conv1d_bwd to the extension module (one
// module, mmssm._ext, whose PYBIND11_MODULE is in selective_scan_cpu.cpp).
void register_causal_conv1d(pybind11::module_& m);

}  // namespace mmssm
